// Helpers shared by the kernels: dtype conversion (float32 math for float/half/bfloat16 data), pixel indexing and
// label checks, bilinear resampling (PyTorch's weights, and which output pixels read an input pixel), the channel
// readers of one pixel (stored logits, or logits interpolated from a lower resolution), the per-pixel softmax
// statistics (one online pass over the C channels, optionally with the label smoothing term), the stable BCE and
// sigmoid, the deterministic block reductions and the finalize launcher.
// Everything but the block reductions is __host__ __device__: tests/cuda_emulation runs the very same per-pixel
// code and finalize arithmetic on the CPU (no GPU needed).
#pragma once

#include <math.h>  // expf, logf, log1pf, isnan, ... also for a host compiler (tests/cuda_emulation)
#include <cstdint>
#include <limits>
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

FAS_HD int64_t label_at(const Strided3& target, const Pixel& px) {
  return static_cast<const int64_t*>(target.data)[offset3(target, px)];
}

FAS_HD bool in_classes(int64_t y, int64_t C) { return static_cast<uint64_t>(y) < static_cast<uint64_t>(C); }

// Class label of px, or -1 when it does not count (ignore_index, or outside [0, C): never used as an index).
FAS_HD int64_t valid_label(const Strided3& target, const Pixel& px, int64_t C, int64_t ignore_index) {
  const int64_t y = label_at(target, px);
  return (y != ignore_index && in_classes(y, C)) ? y : -1;
}

// "No bad label seen": the identity of the min-reduction of first-bad pixel indices.
constexpr int64_t kNoBad = std::numeric_limits<int64_t>::max();

// valid_label for the labelled losses, which also report bad labels (neither ignore_index nor in [0, C)): at pixel
// p with such a label, bad += 1 and first_bad = min(first_bad, p).
FAS_HD int64_t checked_label(const Strided3& target, const Pixel& px, int64_t p, int64_t C, int64_t ignore_index,
                             float& bad, int64_t& first_bad) {
  const int64_t y = label_at(target, px);
  if (in_classes(y, C)) return y != ignore_index ? y : -1;  // an ignore_index in [0, C): that class never counts
  if (y != ignore_index) {
    bad += 1.f;
    first_bad = p < first_bad ? p : first_bad;
  }
  return -1;
}

// ------------------------------------------------------------------------------------------ bilinear resampling
// One axis of PyTorch's bilinear resampling to an explicit size (F.interpolate(x, size, mode="bilinear",
// align_corners), upsample_bilinear2d without scale factors): output index d reads input indices
// i0 = min(floor(src), in - 1) and i1 = min(i0 + 1, in - 1) with weights 1 - l and l, l = src - i0, where
//   align_corners:  src = d * (in - 1) / (out - 1)  (0 when out == 1)
//   otherwise:      src = max((d + 0.5) * in / out - 0.5, 0).
// scale and src are float32, and src is one fused multiply-add: the single rounding of PyTorch's kernels (its CPU
// build contracts the expression, so does nvcc), so the weights agree with F.interpolate's to the bit.
// The same formulas hold for downsampling (out < in), where some input indices are read by no output index.
struct Axis {
  int64_t in, out;
  float scale;
  bool align_corners;
};

inline Axis make_axis(int64_t in, int64_t out, bool align_corners) {
  float scale;
  if (align_corners) {
    scale = out > 1 ? static_cast<float>(in - 1) / static_cast<float>(out - 1) : 0.f;
  } else {
    scale = static_cast<float>(in) / static_cast<float>(out);
  }
  return Axis{in, out, scale, align_corners};
}

struct Taps {
  int64_t i0, i1;
  float l0, l1;
};

// src of output index d, given as float(d)
FAS_HD float source_index(const Axis& a, float fd) {
  const float src = a.align_corners ? a.scale * fd : fmaf(a.scale, fd + 0.5f, -0.5f);
  return src < 0.f ? 0.f : src;
}

// The taps of a source index whose i0 is known (fi0 = float(i0)).
FAS_HD Taps taps_of(const Axis& a, float src, int64_t i0, float fi0) {
  float l1 = src - fi0;
  l1 = l1 < 0.f ? 0.f : (l1 > 1.f ? 1.f : l1);
  return Taps{i0, i0 < a.in - 1 ? i0 + 1 : i0, 1.f - l1, l1};
}

FAS_HD Taps taps_at(const Axis& a, int64_t d) {
  const float src = source_index(a, static_cast<float>(d));
  int64_t i0 = static_cast<int64_t>(src);  // src >= 0: truncation is floor
  i0 = i0 < a.in - 1 ? i0 : a.in - 1;
  return taps_of(a, src, i0, static_cast<float>(i0));
}

// The weight with which output index d (taps t) reads input index i: both weights where i0 == i1 == i (the last
// input index), as PyTorch's backward adds both there.
FAS_HD float tap_weight(const Taps& t, int64_t i) {
  return (t.i0 == i ? t.l0 : 0.f) + (t.i1 == i ? t.l1 : 0.f);
}

// The first output index whose i0 is >= k (a.out when there is none). i0 never decreases along the output axis
// (every step of taps_at is monotonic), so the output indices reading input index i (i0 == i - 1, whose i1 is i,
// or i0 == i) are the range [first_reaching(a, i - 1), first_reaching(a, i + 1)). The estimate from the real-valued
// inverse of src is off by at most a step or two; the float32 taps themselves settle it.
FAS_HD int64_t first_reaching(const Axis& a, int64_t k) {
  if (k <= 0) return 0;
  if (k > a.in - 1 || a.scale <= 0.f) return a.out;
  const double scale = static_cast<double>(a.scale);
  const double e = a.align_corners ? static_cast<double>(k) / scale : (static_cast<double>(k) + 0.5) / scale - 0.5;
  int64_t d = e <= 0.0 ? 0 : (e >= static_cast<double>(a.out) ? a.out : static_cast<int64_t>(e));
  while (d < a.out && taps_at(a, d).i0 < k) ++d;
  while (d > 0 && taps_at(a, d - 1).i0 >= k) --d;
  return d;
}

// Bilinear blend of the four source values (x_rc: source row r, column c) with weights (h0, h1) x (w0, w1):
// rows of the two source rows first, as PyTorch's kernels do, each a fused multiply-add onto the second product.
FAS_HD float blend(float x00, float x01, float x10, float x11, const Taps& th, const Taps& tw) {
  return fmaf(th.l0, fmaf(tw.l0, x00, tw.l1 * x01), th.l1 * fmaf(tw.l0, x10, tw.l1 * x11));
}

// sum over the output pixels (h, w) that read input pixel (i, j), rows outer, each in increasing order, of
// tap_weight(rows) * tap_weight(cols) * g(h, w, hr, wr, th, tw): the adjoint of the resampling applied to a
// gradient g given at the output grid, as one deterministic gather (a fixed order, no atomics).
// Along each axis the range is two runs: r = 0, the outputs whose i0 is i - 1 (they read i as their i1), then
// r = 1, those whose i0 is i. So output row h reads input rows i - 1 + hr and min(i + hr, in - 1) (the same for
// columns), which g can take from a table of three rows; and the taps come without a float-to-int conversion
// (a quarter-rate instruction), the output coordinate stepping in float32 (exact below 2**24).
template <typename G>
FAS_HD float gather_adjoint(const Axis& rows, const Axis& cols, int64_t i, int64_t j, G&& g) {
  const int64_t hb[3] = {first_reaching(rows, i - 1), first_reaching(rows, i), first_reaching(rows, i + 1)};
  const int64_t wb[3] = {first_reaching(cols, j - 1), first_reaching(cols, j), first_reaching(cols, j + 1)};
  float acc = 0.f;
FAS_UNROLL
  for (int hr = 0; hr < 2; ++hr) {
    const int64_t i0 = i - 1 + hr;
    const float fi0 = static_cast<float>(i0);
    float fh = static_cast<float>(hb[hr]);
    for (int64_t h = hb[hr]; h < hb[hr + 1]; ++h, fh += 1.f) {
      const Taps th = taps_of(rows, source_index(rows, fh), i0, fi0);
      float row = 0.f;
FAS_UNROLL
      for (int wr = 0; wr < 2; ++wr) {
        const int64_t j0 = j - 1 + wr;
        const float fj0 = static_cast<float>(j0);
        float fw = static_cast<float>(wb[wr]);
        for (int64_t w = wb[wr]; w < wb[wr + 1]; ++w, fw += 1.f) {
          const Taps tw = taps_of(cols, source_index(cols, fw), j0, fj0);
          row += tap_weight(tw, j) * g(h, w, hr, wr, th, tw);
        }
      }
      acc += tap_weight(th, i) * row;
    }
  }
  return acc;
}

#define FASTADVSEG_PIXEL_LOOP(p, P) \
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < (P); \
       p += static_cast<int64_t>(gridDim.x) * blockDim.x)

// --------------------------------------------------------------------------------------------------- math
// Channel values a thread loads back to back before using them: several loads in flight per thread (the channel
// loop of one pixel is otherwise a chain of dependent load-use steps), which is what keeps DRAM busy.
constexpr int kChunk = 4;

// Where the C channel values of one pixel are, as the losses see them, in float32: at(x, c) is channel c of the
// pixel in the tensor x (the pointer is passed at each read, as a restrict parameter, so that the reads stay
// non-aliased loads after inlining).
// StoredAt: the values stored at the pixel itself (base: channel 0's offset, sc: the channel stride).
struct StoredAt {
  int64_t base, sc;
  template <typename T>
  FAS_HD float operator()(const T* __restrict__ x, int64_t c) const { return to_float(x[base + c * sc]); }
};

// InterpolatedAt: the logits of a label-grid pixel bilinearly interpolated from the four pixels of a lower
// resolution around it (o_rc: channel 0's offset of source row r, column c), in float32 from the stored values,
// never rounded to x's dtype: F.interpolate(x.float(), size, mode="bilinear", align_corners) at that pixel.
struct InterpolatedAt {
  int64_t sc, o00, o01, o10, o11;
  Taps th, tw;
  template <typename T>
  FAS_HD float operator()(const T* __restrict__ x, int64_t c) const {
    const int64_t o = c * sc;
    return blend(to_float(x[o00 + o]), to_float(x[o01 + o]), to_float(x[o10 + o]), to_float(x[o11 + o]), th, tw);
  }
};

// The reader of logits x (N, C, h, w) at the label-grid pixel of image n whose taps are th (rows) and tw (columns).
FAS_HD InterpolatedAt interpolated_at(const Strided4& x, int64_t n, const Taps& th, const Taps& tw) {
  const int64_t b = n * x.sn;
  const int64_t r0 = b + th.i0 * x.sh, r1 = b + th.i1 * x.sh, c0 = tw.i0 * x.sw, c1 = tw.i1 * x.sw;
  return InterpolatedAt{x.sc, r0 + c0, r0 + c1, r1 + c0, r1 + c1, th, tw};
}

// f(c, at(x, c)) for c = first .. C-1, in order, with the loads batched kChunk at a time.
template <typename T, typename R, typename F>
FAS_HD void for_channels(const T* __restrict__ x, const R& at, int64_t first, int64_t C, F&& f) {
  int64_t c = first;
  for (; c + kChunk <= C; c += kChunk) {
    float v[kChunk];
FAS_UNROLL
    for (int j = 0; j < kChunk; ++j) v[j] = at(x, c + j);
FAS_UNROLL
    for (int j = 0; j < kChunk; ++j) f(c + j, v[j]);
  }
  for (; c < C; ++c) f(c, at(x, c));
}

template <typename T, typename F>
FAS_HD void for_channels(const T* __restrict__ x, int64_t base, int64_t sc, int64_t first, int64_t C, F&& f) {
  for_channels(x, StoredAt{base, sc}, first, C, static_cast<F&&>(f));
}

// Label smoothing of the cross-entropy (PyTorch's F.cross_entropy(label_smoothing=eps)): keep = 1 - eps,
// each = eps / C; weight: the C class weights or nullptr (all 1).
struct Smoothing {
  float keep, each;
  const float* weight;
};

inline Smoothing make_smoothing(float eps, int64_t C, const float* weight) {
  const float each = C > 0 ? static_cast<float>(static_cast<double>(eps) / static_cast<double>(C)) : 0.f;
  return Smoothing{1.f - eps, each, weight};
}

// Softmax statistics of one pixel in one pass over the channels (online max / rescaled sum):
// m = max_c x_c, s = sum_c exp(x_c - m), so log-sum-exp = m + log(s); xsel = x[sel];
// arg = first index of the maximum (a NaN counts as the maximum, like torch.argmax) when kArgmax;
// when kSmooth: wsum = sum_c w_c and t = sum_c w_c (x_c - m) (rescaled online like s: no cancellation between
// large logits), so sum_c w_c (lse - x_c) = wsum * log(s) - t.
// Non-finite logits behave as in PyTorch: a NaN makes s (and t) NaN; -inf logits contribute 0 to s next to a
// finite maximum (and -inf to t: an infinite smoothing loss, as -log_softmax = inf gives); a pixel whose logits
// are all -inf is NaN; a +inf logit makes the whole pixel NaN (x - max = inf - inf).
struct RowStats {
  float m, s, xsel;
  int64_t arg;
  float t, wsum;
};

template <bool kArgmax, bool kSmooth = false, typename T, typename R>
FAS_HD RowStats row_stats_of(const T* __restrict__ x, const R& at, int64_t C, int64_t sel,
                             const float* __restrict__ weight = nullptr) {
  const float x0 = at(x, 0);
  RowStats r;
  r.m = x0;
  r.s = 1.f;
  r.xsel = x0;
  r.arg = 0;
  r.t = 0.f;  // w_0 (x_0 - m) with m = x_0: exactly 0 (also for x_0 = -inf)
  r.wsum = kSmooth ? (weight != nullptr ? weight[0] : 1.f) : 0.f;
  float best = x0;
  for_channels(x, at, 1, C, [&](int64_t c, float v) {
    const float wc = (kSmooth && weight != nullptr) ? weight[c] : 1.f;
    if (v > r.m) {
      r.s = r.s * expf(r.m - v) + 1.f;
      if (kSmooth) r.t += r.wsum * (r.m - v);  // the channels so far, measured from the new maximum
      r.m = v;
    } else {
      r.s += (v == r.m) ? 1.f : expf(v - r.m);  // v == m: exp(0), also when both are -inf (not exp(NaN))
      if (kSmooth && v != r.m) r.t += wc * (v - r.m);
    }
    if (kSmooth) r.wsum += wc;
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

template <typename T, bool kArgmax, bool kSmooth = false>
FAS_HD RowStats row_stats(const T* __restrict__ x, int64_t base, int64_t sc, int64_t C, int64_t sel,
                          const float* __restrict__ weight = nullptr) {
  return row_stats_of<kArgmax, kSmooth>(x, StoredAt{base, sc}, C, sel, weight);
}

// The cross-entropy of one counted pixel with label y and weight wy from its statistics:
// (1 - eps) w_y (lse - x_y) + (eps/C) sum_c w_c (lse - x_c), or w_y (lse - x_y) without smoothing.
template <bool kSmooth>
FAS_HD float ce_loss(const RowStats& r, float wy, const Smoothing& sm) {
  const float log_s = logf(r.s);
  const float nll = r.m + log_s - r.xsel;
  if (!kSmooth) return wy * nll;
  return sm.keep * wy * nll + sm.each * (r.wsum * log_s - r.t);
}

// The gradient of one counted pixel's loss w.r.t. its logit c from p_c = softmax(x)_c, one formula for the
// kernels that write it per pixel and the gathers of upsampled logits (which recompute p_c from a saved
// log-sum-exp).
template <bool kSmooth>
FAS_HD float nll_grad(float p, int64_t c, int64_t sel, float scale, float wsum, const Smoothing& sm) {
  float d = scale * (p - (c == sel ? 1.f : 0.f));
  if (kSmooth) d += sm.each * (wsum * p - (sm.weight != nullptr ? sm.weight[c] : 1.f));
  return d;
}

// The gradient of one counted pixel, written for every channel c:
//   scale * (softmax(x)_c - [c == sel])                                   without smoothing,
//   scale * (p_c - [c == sel]) + (eps/C) (wsum * p_c - w_c)              with (scale = (1 - eps) w_y).
template <typename T, bool kSmooth = false>
FAS_HD void write_nll_grad(const T* __restrict__ x, int64_t xbase, int64_t xsc, T* __restrict__ g,
                           int64_t gbase, int64_t gsc, int64_t C, const RowStats& r, int64_t sel, float scale,
                           const Smoothing& sm = Smoothing{1.f, 0.f, nullptr}) {
  const float inv_s = 1.f / r.s;
  for_channels(x, xbase, xsc, 0, C, [&](int64_t c, float v) {
    g[gbase + c * gsc] = from_float<T>(nll_grad<kSmooth>(expf(v - r.m) * inv_s, c, sel, scale, r.wsum, sm));
  });
}

template <typename T>
FAS_HD void write_zeros(T* __restrict__ g, int64_t gbase, int64_t gsc, int64_t C) {
  const T zero = from_float<T>(0.f);
  for (int64_t c = 0; c < C; ++c) g[gbase + c * gsc] = zero;
}

// torch's sigmoid formula (the gradients of the BCE terms); never NaN for finite or infinite z. The semi keep
// mask does not use it (keep_pixel in pixel_ops.cuh compares z with logit(T)).
FAS_HD float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }

// BCE with logits in PyTorch's form (1 - t)*z + softplus(-z), softplus(-z) = max(-z, 0) + log1p(exp(-|z|)):
// finite for finite z, and infinities give what PyTorch gives (inf for z = +inf, t = 0; NaN for 0 * inf).
FAS_HD float bce_logits(float z, float t) {
  return (1.f - t) * z + (fmaxf(-z, 0.f) + log1pf(expf(-fabsf(z))));
}

// ------------------------------------------------------------------------------------ deterministic sums
// A loss's workspace (see workspace_bytes in launchers.cuh): G per-block smallest bad pixel indices (labelled ops),
// then the rows of per-block float sums, row k at partials[k * G + block].
struct Workspace {
  float* partials;
  int64_t* first_bad;  // nullptr for ops without labels
  int64_t G;
};

inline Workspace carve_workspace(void* ws, int64_t pixels, bool labelled) {
  const int64_t G = grid_blocks(pixels);
  char* bytes = static_cast<char*>(ws);
  if (!labelled) return Workspace{reinterpret_cast<float*>(bytes), nullptr, G};
  return Workspace{reinterpret_cast<float*>(bytes + G * 8), reinterpret_cast<int64_t*>(bytes), G};
}

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

// The block's smallest per-thread first bad pixel index, written to first_bad[blockIdx.x] (kNoBad when none).
// Every thread of the block must call it.
__device__ __forceinline__ void block_first_bad(int64_t v, int64_t* __restrict__ first_bad) {
  constexpr int kWarps = kThreads / 32;
  __shared__ long long warp_min[kWarps];
  long long m = static_cast<long long>(v);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const long long other = __shfl_down_sync(0xffffffffu, m, o);
    m = other < m ? other : m;
  }
  if ((threadIdx.x & 31) == 0) warp_min[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    long long b = warp_min[0];
#pragma unroll
    for (int i = 1; i < kWarps; ++i) b = warp_min[i] < b ? warp_min[i] : b;
    first_bad[blockIdx.x] = static_cast<int64_t>(b);
  }
}
#endif  // __CUDACC__

// What the finalize block writes: the K column sums as float32 to sums[0..K-1]; for a labelled op (bad != nullptr)
// also bad[0] = row K (the bad-label count) and bad[1] = target's label at the smallest first-bad pixel index,
// read through its strides (0 when there is none).
struct Finalize {
  int K;
  float* sums;
  int64_t* bad;
  Strided3 target;  // absent for ops without labels and for the unlabelled generator (then bad = [0, 0])
  int64_t H, W;     // the label map's grid, to turn a pixel index back into (n, h, w)
};

inline Finalize make_finalize(int K, float* sums) { return Finalize{K, sums, nullptr, Strided3{}, 1, 1}; }

inline Finalize make_labelled_finalize(int K, float* sums, int64_t* bad, Strided3 target, int64_t H, int64_t W) {
  return Finalize{K, sums, bad, target, H, W};
}

// The results from the float64 column sums (K, plus the bad count at [K] when labelled) and the smallest first bad
// pixel index (run by the finalize block's thread 0, and by tests/cuda_emulation).
FAS_HD void write_results(const double* col, int64_t first_bad, const Finalize& f) {
  for (int k = 0; k < f.K; ++k) f.sums[k] = static_cast<float>(col[k]);
  if (f.bad != nullptr) {
    f.bad[0] = static_cast<int64_t>(col[f.K]);  // exact: integer-valued partials (< 2**24 per block)
    f.bad[1] = (first_bad != kNoBad && f.target.data != nullptr)
                   ? label_at(f.target, split_pixel(first_bad, f.H * f.W, f.W))
                   : 0;
  }
}

// One block reduces the workspace's rows (K, +1 when labelled) in a fixed order in float64, min-reduces the
// first-bad indices (labelled) and writes the results (write_results). Defined in reduce.cu.
cudaError_t launch_finalize(const Workspace& ws, const Finalize& f, cudaStream_t stream);

// The main kernel's launch error, or else the finalize launch's.
inline cudaError_t then_finalize(cudaError_t err, const Workspace& ws, const Finalize& f, cudaStream_t stream) {
  return err != cudaSuccess ? err : launch_finalize(ws, f, stream);
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
