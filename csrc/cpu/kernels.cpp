// Runtime choice between the kernel builds (kernels_base.cpp, kernels_avx2.cpp, kernels_avx512.cpp): the widest
// one this CPU runs, capped by FASTADVSEG_CPU_ISA=base|avx2|avx512 (tests run each build the CPU has).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <string>
#include <unistd.h>

#include "kernels.h"

namespace fas {

#define FAS_DECLARE_ISA(NS)                                                                                   \
  namespace NS {                                                                                              \
  std::vector<double> fused_loss(const FusedArgs& a);                                                         \
  void softmax_forward(int64_t, int64_t, int64_t, int64_t, const Tensor4&, const Tensor4&, int);              \
  void softmax_backward(int64_t, int64_t, int64_t, int64_t, const Tensor4&, const Tensor4&, const Tensor4&,   \
                        int);                                                                                 \
  void softmax_forward_resized(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, const Tensor4&,     \
                               const Tensor4&, int);                                                          \
  void softmax_backward_resized(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, const Tensor4&,    \
                                const Tensor4&, const Tensor4&, int);                                         \
  void one_hot(int64_t, int64_t, int64_t, int64_t, const Map3&, int64_t, void*, int, uint64_t, int);          \
  std::vector<double> bce_maps(const std::vector<BceArgs>&, int);                                             \
  std::vector<int64_t> find_bad_labels(int64_t, int64_t, int64_t, const Map3&, int64_t, int64_t, int);         \
  }
FAS_DECLARE_ISA(base)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FAS_HAVE_X86_BUILDS 1
FAS_DECLARE_ISA(avx2)
FAS_DECLARE_ISA(avx512)
#endif

namespace {
enum Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

Isa chosen_isa() {
  static const Isa isa = [] {
#ifdef FAS_HAVE_X86_BUILDS
    Isa cap = kAvx512;
    const char* env = std::getenv("FASTADVSEG_CPU_ISA");
    if (env && std::strcmp(env, "base") == 0) cap = kBase;
    if (env && std::strcmp(env, "avx2") == 0) cap = kAvx2;
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
    if (avx512 && cap >= kAvx512) return kAvx512;
    if (avx2 && cap >= kAvx2) return kAvx2;
#endif
    return kBase;
  }();
  return isa;
}
}  // namespace

#ifdef FAS_HAVE_X86_BUILDS
#define FAS_CALL(FN, ...)                                                  \
  (chosen_isa() == kAvx512 ? avx512::FN(__VA_ARGS__)                       \
   : chosen_isa() == kAvx2 ? avx2::FN(__VA_ARGS__)                         \
                           : base::FN(__VA_ARGS__))
#else
#define FAS_CALL(FN, ...) base::FN(__VA_ARGS__)
#endif

const char* isa() {
  switch (chosen_isa()) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "base";
  }
}

// Streaming stores pay off only where ordinary ones would evict what is read. The 2x21x321x321 float32 gradient
// (34.6 MB), forward+backward in one process, store paths interleaved (60 rounds, medians), streamed -> ordinary:
// on the 2-core AMD EPYC VM (family 26, 32 MiB L3 per core complex) streaming is faster: cross_entropy2d 2.50 ->
// 2.90 ms, labelled generator_loss 2.80 -> 3.12, unlabelled 2.83 -> 3.15, softmax2d 5.20 -> 5.61 (a second run:
// 1.31 -> 1.40, 1.73 -> 1.94, 1.91 -> 1.99, 3.94 -> 4.07). On the 2-core Intel Xeon VM (480 MiB L3) it is slower,
// builds alternated twice on an idle machine: softmax2d 5.30, 5.20 -> 3.55, 3.64 ms; cross_entropy2d 3.31, 3.46 ->
// 2.76, 2.73; labelled generator_loss 3.45, 3.45 -> 2.91, 2.90; unlabelled 3.73, 3.81 -> 3.33, 3.40.
// The size that matters is the L3 one core sees, which Linux reads per cache instance (CPUID leaf 4 on Intel,
// 0x8000001D on AMD) into sysfs. glibc's sysconf is not it on AMD: it answers with the whole package (384 MiB on
// that EPYC VM, whose core complex has 32), so it is only the fallback; where neither tells, 8 MiB.
int64_t parse_cache_size(const char* text) {
  char* end = nullptr;
  const long long n = std::strtoll(text, &end, 10);
  if (end == text || n <= 0) return 0;
  switch (*end) {
    case 'K': return static_cast<int64_t>(n) << 10;
    case 'M': return static_cast<int64_t>(n) << 20;
    case 'G': return static_cast<int64_t>(n) << 30;
    case '\0': case '\n': return static_cast<int64_t>(n);
    default: return 0;
  }
}

namespace {
std::string read_line(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return {};
  char buf[64] = {0};
  const bool ok = std::fgets(buf, sizeof buf, f) != nullptr;
  std::fclose(f);
  return ok ? std::string(buf) : std::string();
}
}  // namespace

int64_t l3_cache_bytes() {
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    const std::string level = read_line(dir + "level");
    if (level.empty()) break;
    if (std::atoi(level.c_str()) == 3) {
      const int64_t bytes = parse_cache_size(read_line(dir + "size").c_str());
      if (bytes > 0) return bytes;
    }
  }
#ifdef _SC_LEVEL3_CACHE_SIZE
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (l3 > 0) return static_cast<int64_t>(l3);
#endif
  return 0;
}

int64_t default_stream_bytes() {
  static const int64_t bytes = [] {
    const int64_t floor = int64_t{8} << 20;
    const int64_t half_l3 = l3_cache_bytes() / 2;
    return half_l3 > floor ? half_l3 : floor;
  }();
  return bytes;
}

namespace {
std::atomic<int64_t> stream_bytes_override{0};
}

int64_t stream_bytes() {
  const int64_t v = stream_bytes_override.load(std::memory_order_relaxed);
  return v > 0 ? v : default_stream_bytes();
}

void set_stream_bytes(int64_t bytes) { stream_bytes_override.store(bytes > 0 ? bytes : 0); }

// PyTorch's source index of upsample_bilinear2d (area_pixel_compute_scale / _source_index, guard_index_and_lambda)
// in its opmath float. Its CPU kernels are built with FMA on x86-64 (the AVX2 and AVX-512 dispatch levels) and
// the compiler fuses scale * (d + 0.5) - 0.5 into one multiply-add: std::fma here, so that the weights equal
// PyTorch's bit for bit (tests/test_upsample_cpu.py checks them against F.interpolate). This file is compiled
// once, for the default target, so every kernel build gets the same tables.
ResizeAxis resize_axis(int64_t in, int64_t out, bool align_corners) {
  ResizeAxis a;
  a.in = in;
  a.out = out;
  a.i0.resize(out);
  a.i1.resize(out);
  a.l0.resize(out);
  a.l1.resize(out);
  a.first.assign(in, out);
  a.last.assign(in, -1);
  const float scale = align_corners ? (out > 1 ? static_cast<float>(in - 1) / static_cast<float>(out - 1) : 0.f)
                                    : static_cast<float>(in) / static_cast<float>(out);
  for (int64_t d = 0; d < out; ++d) {
    int64_t i0 = d, i1 = d;
    float l1 = 0.f;
    if (in != out) {  // (PyTorch's kernel copies an axis whose size does not change)
      float src = align_corners ? scale * static_cast<float>(d) : std::fma(scale, static_cast<float>(d) + 0.5f, -0.5f);
      if (!align_corners && src < 0.f) src = 0.f;
      i0 = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
      l1 = std::min(std::max(src - static_cast<float>(i0), 0.f), 1.f);
      i1 = i0 + (i0 < in - 1 ? 1 : 0);
    }
    a.i0[d] = i0;
    a.i1[d] = i1;
    a.l0[d] = 1.f - l1;
    a.l1[d] = l1;
    for (const int64_t i : {i0, i1}) {
      a.first[i] = std::min(a.first[i], d);
      a.last[i] = std::max(a.last[i], d);
    }
  }
  return a;
}

std::vector<double> fused_loss(const FusedArgs& a) { return FAS_CALL(fused_loss, a); }

void softmax_forward(int64_t N, int64_t C, int64_t H, int64_t W, const Tensor4& x, const Tensor4& y, int nt) {
  FAS_CALL(softmax_forward, N, C, H, W, x, y, nt);
}

void softmax_backward(int64_t N, int64_t C, int64_t H, int64_t W, const Tensor4& y, const Tensor4& gy,
                      const Tensor4& gx, int nt) {
  FAS_CALL(softmax_backward, N, C, H, W, y, gy, gx, nt);
}

void softmax_forward_resized(int64_t N, int64_t C, int64_t H, int64_t W, int64_t h, int64_t w, bool align_corners,
                             const Tensor4& x, const Tensor4& y, int nt) {
  FAS_CALL(softmax_forward_resized, N, C, H, W, h, w, align_corners, x, y, nt);
}

void softmax_backward_resized(int64_t N, int64_t C, int64_t H, int64_t W, int64_t h, int64_t w, bool align_corners,
                              const Tensor4& y, const Tensor4& gy, const Tensor4& gx, int nt) {
  FAS_CALL(softmax_backward_resized, N, C, H, W, h, w, align_corners, y, gy, gx, nt);
}

void one_hot(int64_t N, int64_t C, int64_t H, int64_t W, const Map3& labels, int64_t ignore_index, void* out,
             int elem_size, uint64_t one, int nt) {
  FAS_CALL(one_hot, N, C, H, W, labels, ignore_index, out, elem_size, one, nt);
}

std::vector<double> bce_maps(const std::vector<BceArgs>& maps, int nt) { return FAS_CALL(bce_maps, maps, nt); }

std::vector<int64_t> find_bad_labels(int64_t N, int64_t H, int64_t W, const Map3& labels, int64_t C,
                                     int64_t ignore_index, int nt) {
  return FAS_CALL(find_bad_labels, N, H, W, labels, C, ignore_index, nt);
}

}  // namespace fas
