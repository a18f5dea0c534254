// Helpers shared by the kernels: dtype conversion (float32 math for float/half/bfloat16 data), pixel indexing, the
// per-pixel softmax statistics (one online pass over the C channels), the stable BCE and sigmoid, the epilogue
// arithmetic, and the deterministic block reduction + finalize launcher.
// Everything but the block reduction is __host__ __device__: tests/cuda_emulation runs the very same per-pixel code
// on the CPU (no GPU needed) against the reference backend.
#pragma once

#include <math.h>  // expf, logf, log1pf, isnan, ... also for a host compiler (tests/cuda_emulation)
#include <cstdint>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "launchers.cuh"

#define FAS_HD __host__ __device__ __forceinline__
#ifdef __CUDA_ARCH__
#define FAS_UNROLL _Pragma("unroll")
#else
#define FAS_UNROLL  // host pass: the host compiler does not know the pragma
#endif

namespace fastadvseg {
namespace cuda {

// ---------------------------------------------------------------------------------------------- conversions
FAS_HD float to_float(float v) { return v; }
FAS_HD float to_float(__half v) { return __half2float(v); }
FAS_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> FAS_HD T from_float(float v);
template <> FAS_HD float from_float<float>(float v) { return v; }
template <> FAS_HD __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> FAS_HD __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Maps (discriminator logits, BCE targets, their gradients) are small next to the logits: their dtype is a
// runtime code (uniform across the grid, so the branch costs nothing) instead of one more template parameter.
FAS_HD float load_map(const Strided3& m, int64_t off) {
  switch (m.dtype) {
    case kFloat16: return __half2float(static_cast<const __half*>(m.data)[off]);
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(m.data)[off]);
    case kFloat64: return static_cast<float>(static_cast<const double*>(m.data)[off]);
    default: return static_cast<const float*>(m.data)[off];
  }
}

FAS_HD void store_map(const Strided3& m, int64_t off, float v) {
  switch (m.dtype) {
    case kFloat16: static_cast<__half*>(m.data)[off] = __float2half_rn(v); break;
    case kBFloat16: static_cast<__nv_bfloat16*>(m.data)[off] = __float2bfloat16_rn(v); break;
    case kFloat64: static_cast<double*>(m.data)[off] = static_cast<double>(v); break;
    default: static_cast<float*>(m.data)[off] = v; break;
  }
}

// ------------------------------------------------------------------------------------------------- indexing
struct Pixel {
  int64_t n, h, w;
};

// p in [0, N*H*W) -> (n, h, w) for a (.., H, W) grid with HW = H*W.
// 32-bit division when p and H*W fit (the common case; a warp-uniform branch), int64 otherwise.
FAS_HD Pixel split_pixel(int64_t p, int64_t HW, int64_t W) {
  Pixel px;
  if (p <= 0xffffffffll && HW <= 0xffffffffll) {
    const uint32_t p32 = static_cast<uint32_t>(p), hw32 = static_cast<uint32_t>(HW), w32 = static_cast<uint32_t>(W);
    const uint32_t n = p32 / hw32;
    const uint32_t hw = p32 - n * hw32;
    const uint32_t h = hw / w32;
    px.n = n;
    px.h = h;
    px.w = hw - h * w32;
    return px;
  }
  px.n = p / HW;
  const int64_t hw = p - px.n * HW;
  px.h = hw / W;
  px.w = hw - px.h * W;
  return px;
}

FAS_HD int64_t offset3(const Strided3& m, const Pixel& px) {
  return px.n * m.sn + px.h * m.sh + px.w * m.sw;
}

// Offset of channel 0 of pixel px; channel c is at + c * t.sc.
FAS_HD int64_t offset4(const Strided4& t, const Pixel& px) {
  return px.n * t.sn + px.h * t.sh + px.w * t.sw;
}

FAS_HD bool masked(const Strided3& mask, const Pixel& px) {
  return mask.data != nullptr && static_cast<const uint8_t*>(mask.data)[offset3(mask, px)] != 0;
}

// Class label of px, or -1 when it does not count (ignore_index, or outside [0, C): never used as an index).
FAS_HD int64_t valid_label(const Strided3& target, const Pixel& px, int64_t C, int64_t ignore_index) {
  const int64_t y = static_cast<const int64_t*>(target.data)[offset3(target, px)];
  return (y != ignore_index && y >= 0 && y < C) ? y : -1;
}

#define FASTADVSEG_PIXEL_LOOP(p, P) \
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < (P); \
       p += static_cast<int64_t>(gridDim.x) * blockDim.x)

// --------------------------------------------------------------------------------------------------- math
// Channel values a thread loads back to back before using them: several loads in flight per thread (the channel
// loop of one pixel is otherwise a chain of dependent load-use steps), which is what keeps DRAM busy.
constexpr int kChunk = 4;

// f(c, x[c]) for c = first .. C-1, in order, with the loads batched kChunk at a time.
template <typename T, typename F>
FAS_HD void for_channels(const T* __restrict__ x, int64_t base, int64_t sc, int64_t first, int64_t C,
                                             F&& f) {
  int64_t c = first;
  for (; c + kChunk <= C; c += kChunk) {
    float v[kChunk];
FAS_UNROLL
    for (int j = 0; j < kChunk; ++j) v[j] = to_float(x[base + (c + j) * sc]);
FAS_UNROLL
    for (int j = 0; j < kChunk; ++j) f(c + j, v[j]);
  }
  for (; c < C; ++c) f(c, to_float(x[base + c * sc]));
}

// Softmax statistics of one pixel in one pass over the channels (online max / rescaled sum):
// m = max_c x_c, s = sum_c exp(x_c - m), so log-sum-exp = m + log(s); xsel = x[sel];
// arg = first index of the maximum (a NaN counts as the maximum, like torch.argmax) when kArgmax.
// Non-finite logits behave as in PyTorch: a NaN makes s NaN; -inf logits contribute 0 next to a finite maximum
// (and a pixel whose logits are all -inf is NaN); a +inf logit makes the whole pixel NaN (x - max = inf - inf).
struct RowStats {
  float m, s, xsel;
  int64_t arg;
};

template <typename T, bool kArgmax>
FAS_HD RowStats row_stats(const T* __restrict__ x, int64_t base, int64_t sc, int64_t C, int64_t sel) {
  const float x0 = to_float(x[base]);
  RowStats r;
  r.m = x0;
  r.s = 1.f;
  r.xsel = x0;
  r.arg = 0;
  float best = x0;
  for_channels(x, base, sc, 1, C, [&](int64_t c, float v) {
    if (v > r.m) {
      r.s = r.s * expf(r.m - v) + 1.f;
      r.m = v;
    } else {
      r.s += (v == r.m) ? 1.f : expf(v - r.m);  // v == m: exp(0), also when both are -inf (not exp(NaN))
    }
    if (!kArgmax && c == sel) r.xsel = v;
    if (kArgmax && (v > best || (isnan(v) && !isnan(best)))) {
      best = v;
      r.arg = c;
    }
  });
  if (isinf(r.m) && r.m > 0.f) r.s = nanf("");
  if (kArgmax) r.xsel = best;
  return r;
}

// d(-log softmax(x)[sel]) / dx_c = softmax(x)_c - [c == sel], times `scale`, written for every channel.
template <typename T>
FAS_HD void write_nll_grad(const T* __restrict__ x, int64_t xbase, int64_t xsc, T* __restrict__ g,
                                               int64_t gbase, int64_t gsc, int64_t C, const RowStats& r, int64_t sel,
                                               float scale) {
  const float inv_s = 1.f / r.s;
  for_channels(x, xbase, xsc, 0, C, [&](int64_t c, float v) {
    const float p = expf(v - r.m) * inv_s;
    g[gbase + c * gsc] = from_float<T>(scale * (p - (c == sel ? 1.f : 0.f)));
  });
}

template <typename T>
FAS_HD void write_zeros(T* __restrict__ g, int64_t gbase, int64_t gsc, int64_t C) {
  const T zero = from_float<T>(0.f);
  for (int64_t c = 0; c < C; ++c) g[gbase + c * gsc] = zero;
}

// torch's sigmoid formula (so the semi mask's `sigmoid(z) > threshold` matches it bit for bit); never NaN for
// finite or infinite z.
FAS_HD float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }

// BCE with logits in PyTorch's form (1 - t)*z + softplus(-z), softplus(-z) = max(-z, 0) + log1p(exp(-|z|)):
// finite for finite z, and infinities give what PyTorch gives (inf for z = +inf, t = 0; NaN for 0 * inf).
FAS_HD float bce_logits(float z, float t) {
  return (1.f - t) * z + (fmaxf(-z, 0.f) + log1pf(expf(-fabsf(z))));
}

// ------------------------------------------------------------------------------------ deterministic sums
#ifdef __CUDACC__  // device-only (a host compiler building tests/cuda_emulation skips it)
// Sum K per-thread values over the block (fixed shuffle tree, then warps in order) and write the block's sums
// to partials[k * G + blockIdx.x]. Every thread of the block must call it (no early returns in the kernels).
template <int K>
__device__ __forceinline__ void block_sums_to_partials(const float (&v)[K], float* __restrict__ partials, int64_t G) {
  constexpr int kWarps = kThreads / 32;
  __shared__ float warp_sums[K][kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float s = v[k];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    if (lane == 0) warp_sums[k][warp] = s;
  }
  __syncthreads();
  if (threadIdx.x < K) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) s += warp_sums[threadIdx.x][i];
    partials[threadIdx.x * G + blockIdx.x] = s;
  }
}
#endif  // __CUDACC__

// What the finalize block computes from the K column sums.
enum EpilogueKind : int {
  kEpiMean = 0,           // [sum, count] -> out0 = loss (mean or sum), out1 = denominator
  kEpiSemi = 1,           // [sum, kept, considered] -> out0 = loss, out1 = denominator, out2 = kept ratio
  kEpiDiscriminator = 2,  // [fake sum, fake count, real sum, real count] -> out0 = loss, out1/out2 = denominators
  kEpiGenerator = 3,      // [ce sum, ce count, adv sum, adv count, semi sum, semi count] -> see launchers.cuh
};

struct Epilogue {
  int kind;
  int reduction;
  int labelled;
  double lambda_adv;
  double lambda_semi;
  double pixels;
  Outputs out;
};

FAS_HD double denominator(double count) { return count > 0.0 ? count : 1.0; }

FAS_HD void put_output(const Outputs& out, int i, double v) {
  if (out.p[i] != nullptr) *out.p[i] = static_cast<float>(v);
}

// The op's results from its K column sums (see EpilogueKind): means divide by count, or by 1 when nothing counted.
FAS_HD void apply_epilogue(const double* sums, const Epilogue& epi) {
  const Outputs& out = epi.out;
  switch (epi.kind) {
    case kEpiMean:
    case kEpiSemi: {
      const double den = epi.reduction == kReduceMean ? denominator(sums[1]) : 1.0;
      put_output(out, 0, sums[0] / den);
      put_output(out, 1, den);
      if (epi.kind == kEpiSemi) put_output(out, 2, sums[1] / (sums[2] > 1.0 ? sums[2] : 1.0));
      break;
    }
    case kEpiDiscriminator: {
      const double den_fake = denominator(sums[1]);
      const double den_real = denominator(sums[3]);
      put_output(out, 0, sums[0] / den_fake + sums[2] / den_real);
      put_output(out, 1, den_fake);
      put_output(out, 2, den_real);
      break;
    }
    case kEpiGenerator: {
      const double den_ce = denominator(sums[1]);
      const double den_adv = denominator(sums[3]);
      const double den_semi = denominator(sums[5]);
      // each field is rounded to float32 first, so total is exactly what the returned fields give
      const double ce = epi.labelled ? static_cast<float>(sums[0] / den_ce) : 0.0;
      const double adv = static_cast<float>(sums[2] / den_adv);
      const double semi = epi.labelled ? 0.0 : static_cast<float>(sums[4] / den_semi);
      const double total = epi.labelled ? ce + epi.lambda_adv * adv : epi.lambda_adv * adv + epi.lambda_semi * semi;
      put_output(out, 0, total);
      put_output(out, 1, ce);
      put_output(out, 2, adv);
      put_output(out, 3, semi);
      put_output(out, 4, epi.labelled ? 0.0 : sums[5] / (epi.pixels > 1.0 ? epi.pixels : 1.0));
      put_output(out, 5, den_ce);
      put_output(out, 6, den_adv);
      put_output(out, 7, den_semi);
      break;
    }
    default:
      break;
  }
}

// One block reduces partials (K rows of G floats) in a fixed order and applies the epilogue. Defined in reduce.cu.
cudaError_t launch_finalize(const float* partials, int64_t G, int K, const Epilogue& epi, cudaStream_t stream);

inline Epilogue make_epilogue(int kind, int reduction, Outputs out) {
  Epilogue epi{};
  epi.kind = kind;
  epi.reduction = reduction;
  epi.out = out;
  return epi;
}

// The main kernel's launch error, or else the finalize launch's.
inline cudaError_t then_finalize(cudaError_t err, const float* partials, int64_t G, int K, const Epilogue& epi,
                                 cudaStream_t stream) {
  return err != cudaSuccess ? err : launch_finalize(partials, G, K, epi, stream);
}

// Calls launch(T{}) with T the logits' element type (float, __half, __nv_bfloat16): every logits kernel is
// instantiated for exactly these three.
template <typename F>
inline cudaError_t dispatch_logits(int dtype, F&& launch) {
  switch (dtype) {
    case kFloat32: return launch(float{});
    case kFloat16: return launch(__half{});
    case kBFloat16: return launch(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

inline unsigned grid_of(int64_t blocks) { return static_cast<unsigned>(blocks); }

}  // namespace cuda
}  // namespace fastadvseg
