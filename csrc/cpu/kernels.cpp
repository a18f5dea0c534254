// Runtime choice between the kernel builds (kernels_base.cpp, kernels_avx2.cpp): AVX2 + FMA where the CPU has
// both, unless FASTADVSEG_CPU_ISA=base asks for the portable build (tests run both).
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace fas {

#define FAS_DECLARE_ISA(NS)                                                                                   \
  namespace NS {                                                                                              \
  std::vector<double> fused_loss(const FusedArgs& a);                                                         \
  void softmax_forward(int64_t, int64_t, int64_t, int64_t, const Tensor4&, const Tensor4&, int);              \
  void softmax_backward(int64_t, int64_t, int64_t, int64_t, const Tensor4&, const Tensor4&, const Tensor4&,   \
                        int);                                                                                 \
  void one_hot(int64_t, int64_t, int64_t, int64_t, const Map3&, int64_t, void*, int, uint64_t, int);          \
  std::vector<double> bce_maps(const std::vector<BceArgs>&, int);                                             \
  }
FAS_DECLARE_ISA(base)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FAS_HAVE_AVX2_BUILD 1
FAS_DECLARE_ISA(avx2)
#endif

namespace {
bool use_avx2() {
#ifdef FAS_HAVE_AVX2_BUILD
  static const bool yes = [] {
    const char* env = std::getenv("FASTADVSEG_CPU_ISA");
    if (env && std::strcmp(env, "base") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
#else
  return false;
#endif
}
}  // namespace

#ifdef FAS_HAVE_AVX2_BUILD
#define FAS_CALL(FN, ...) (use_avx2() ? avx2::FN(__VA_ARGS__) : base::FN(__VA_ARGS__))
#else
#define FAS_CALL(FN, ...) base::FN(__VA_ARGS__)
#endif

const char* isa() { return use_avx2() ? "avx2" : "base"; }

std::vector<double> fused_loss(const FusedArgs& a) { return FAS_CALL(fused_loss, a); }

void softmax_forward(int64_t N, int64_t C, int64_t H, int64_t W, const Tensor4& x, const Tensor4& y, int nt) {
  FAS_CALL(softmax_forward, N, C, H, W, x, y, nt);
}

void softmax_backward(int64_t N, int64_t C, int64_t H, int64_t W, const Tensor4& y, const Tensor4& gy,
                      const Tensor4& gx, int nt) {
  FAS_CALL(softmax_backward, N, C, H, W, y, gy, gx, nt);
}

void one_hot(int64_t N, int64_t C, int64_t H, int64_t W, const Map3& labels, int64_t ignore_index, void* out,
             int elem_size, uint64_t one, int nt) {
  FAS_CALL(one_hot, N, C, H, W, labels, ignore_index, out, elem_size, one, nt);
}

std::vector<double> bce_maps(const std::vector<BceArgs>& maps, int nt) { return FAS_CALL(bce_maps, maps, nt); }

}  // namespace fas
