// Kernels of the cpu backend (see kernels.h for the contract), compiled once per instruction set:
// kernels_base.cpp (the portable build), kernels_avx2.cpp (AVX2 + FMA) and kernels_avx512.cpp, namespace
// fas::FAS_ISA; kernels.cpp picks one at runtime.
//
// Work is cut into blocks of B pixels along a "row" (an image when H and W can be merged into one pixel axis
// of constant stride in every 4-D tensor involved, else one image row), and a block into pixel vectors (kV
// pixels of one channel in a register). For one pixel vector the fused kernel walks the channels twice (max,
// then exp / sum / label logit) keeping its per-pixel state in registers, then writes the gradient. Rows with
// unit pixel stride are read and written in place in their own dtype (Rows<Tag>); other layouts are first
// converted into a per-thread float32 scratch laid out [C][B]. Each logit is read from memory once (the second
// walk hits L1), and the lines of the blocks two ahead are prefetched while this one is computed. Pseudo-labels
// from a separate teacher add walks over its channels (max and argmax; for the confidence test also the sum of
// exp); from the logits themselves, their own max, argmax and sum of exp serve for both, with no extra walk.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <type_traits>

#include "dtypes.h"
#include "kernels.h"

#ifndef FAS_ISA
#error "define FAS_ISA (the namespace of this instruction-set variant) before including kernels_impl.h"
#endif

// What the build targets. `#pragma GCC target` (kernels_avx2.cpp, kernels_avx512.cpp) does not define __AVX2__,
// __FMA__ or __AVX512F__ (GCC 12), so those files say it with FAS_TARGET_*; a native build (-march=native)
// defines the compiler's own macros.
#if defined(FAS_TARGET_AVX512) || defined(__AVX512F__)
#define FAS_HAS_AVX512 1
#endif
#if defined(FAS_HAS_AVX512) || defined(FAS_TARGET_AVX2) || (defined(__AVX2__) && defined(__FMA__))
#define FAS_HAS_AVX2_FMA 1
#endif

#if defined(__GNUC__) && !defined(__clang__)
// pixel vectors are passed between internal inline functions only: the ABI note for 32- and 64-byte vectors
// (AVX2 and AVX-512 code compiled by `#pragma GCC target` on a default SSE2 target) does not concern them
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace fas {
namespace FAS_ISA {
namespace {

// Sum of v[0..len) in double, in a fixed order (8 interleaved lanes, then the lanes in order): deterministic,
// and not a serial chain of dependent additions.
inline double sum_fixed(const float* v, int64_t len) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t b = 0;
  for (; b + 8 <= len; b += 8)
    for (int k = 0; k < 8; ++k) lane[k] += static_cast<double>(v[b + k]);
  for (int k = 0; b < len; ++b, ++k) lane[k] += static_cast<double>(v[b]);
  double total = 0;
  for (int k = 0; k < 8; ++k) total += lane[k];
  return total;
}

inline int64_t count_nonzero(const int32_t* v, int64_t len) {
  int64_t total = 0;
  for (int64_t b = 0; b < len; ++b) total += v[b] != 0;
  return total;
}

// The keep rule of L_semi (keep_mode), one formula for every backend (fastadvseg/_keep.py, whose keep_logit this
// mirrors operation for operation): sigmoid(z) > T is decided as z > logit(T), z and T in float32, compared as
// real numbers. Computed once per call: logit(T) in double (log1p((2T - 1) / (1 - T)) for T in [1/4, 3/4], where
// log(T) - log1p(-T) would cancel; both 2T - 1 and 1 - T are exact), then rounded *down* to float32, so that the
// float32 comparison z > L is exactly z > logit(T). T <= 0 gives -inf (every z kept but -inf and NaN), T >= 1
// gives +inf (nothing kept); a NaN z is never kept.
inline float keep_logit(float threshold) {
  const double t = static_cast<double>(threshold);
  if (t <= 0.0) return -std::numeric_limits<float>::infinity();
  if (t >= 1.0) return std::numeric_limits<float>::infinity();
  const double exact = (t >= 0.25 && t <= 0.75) ? std::log1p((2.0 * t - 1.0) / (1.0 - t))
                                                : std::log(t) - std::log1p(-t);
  const float low = static_cast<float>(exact);
  return static_cast<double>(low) > exact ? std::nextafter(low, -std::numeric_limits<float>::infinity()) : low;
}

// ---- Pixel vectors: kV pixels of one channel in a register (GCC/Clang vector extensions: 4 lanes in the
// portable build, 8 with AVX2, 16 with AVX-512). The logit loops below keep a pixel
// vector's running max, sum of exp and label logit in registers while they walk the channels, so each logit is
// loaded, used and stored once per pass instead of reloading per-pixel state from memory for every channel.
#if defined(FAS_HAS_AVX512)
constexpr int kV = 16;
#elif defined(FAS_HAS_AVX2_FMA)
constexpr int kV = 8;
#else
// The portable build: 16-byte vectors, the width SSE2 (and NEON) registers hold. Wider generic vectors are split
// by the compiler, and their selects were split into scalar code: measured ~15x slower per logit than AVX2.
constexpr int kV = 4;
#endif
typedef float vf __attribute__((vector_size(4 * kV)));
typedef int32_t vi __attribute__((vector_size(4 * kV)));

inline vf vsplat(float f) { return vf{} + f; }
inline vi vsplat_i(int32_t i) { return vi{} + i; }
inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vi vload_i(const int32_t* p) {
  vi v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void vstore_i(int32_t* p, vi v) { std::memcpy(p, &v, sizeof v); }
inline vf vbits_f(vi v) { return (vf)v; }  // (a cast between vector types of one size keeps the bits)
inline vi vbits_i(vf v) { return (vi)v; }
// m ? a : b on lanes (m: all-ones or all-zeros lanes, as comparisons give): one blend instruction
inline vf vselect(vi m, vf a, vf b) { return m ? a : b; }
inline vi vselect_i(vi m, vi a, vi b) { return m ? a : b; }

#if defined(FAS_HAS_AVX512)
inline vf vfma(vf a, vf b, vf c) { return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
#elif defined(FAS_HAS_AVX2_FMA)
inline vf vfma(vf a, vf b, vf c) { return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
#else
inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
#endif

// The math, branch-free on every lane, ~1 ulp: exp(x) for x <= 0 and log(x) for x > 0 (Cephes-style range
// reductions and polynomials), NaN in, NaN out.

// exp(r) for |r| <= ln2/2, the reduced argument of x = n ln2 + r: 1 + r + r^2 P(r), P of degree 3 fitted for the
// relative error (max 1.6e-7 in float32 arithmetic, ~1.4 ulp; Cephes' degree-5 P gave ~1 ulp for two more FMAs).
inline vf vexp_reduced(vf r) {
  vf p = vsplat(8.31253e-3f);
  p = vfma(p, r, vsplat(4.189011e-2f));
  p = vfma(p, r, vsplat(1.6667114e-1f));
  p = vfma(p, r, vsplat(4.9999232e-1f));
  return vfma(p, r * r, r) + vsplat(1.0f);
}

#if defined(FAS_HAS_AVX512)
// AVX-512: the same reduction and polynomial, with rounding (vrndscaleps) and the final 2^n (vscalefps) in one
// instruction each; vscalefps gives subnormals and 0 below the normal range, so no underflow selects. Inputs are
// clamped at -104 (exp underflows to 0 below about -103.97); max(c, x) returns x when x is NaN: NaN in, NaN out.
inline vf vexp_nonpositive(vf x) {
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-104.0f), (__m512)x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf r = vfma((vf)n, vsplat(-0.693359375f), (vf)xc);
  r = vfma((vf)n, vsplat(2.12194440e-4f), r);
  const vf p = vexp_reduced(r);
  return (vf)_mm512_scalef_ps((__m512)p, n);
}
#else
// x = n ln2 + r, 2^n added to the exponent bits; exp(x) < 1.2e-37 for x < -85 is returned as 0 (softmax terms
// that small do not change a float32 sum).
inline vf vexp_nonpositive(vf x) {
  const vf magic = vsplat(12582912.0f);
  const vi tiny = x < vsplat(-85.0f);
  const vf xc = vselect(tiny, vsplat(-85.0f), x);
  const vf t = vfma(xc, vsplat(1.44269504088896341f), magic);
  const vf n = t - magic;
  vf r = vfma(n, vsplat(-0.693359375f), xc);
  r = vfma(n, vsplat(2.12194440e-4f), r);
  const vf p = vexp_reduced(r);
  const vi shift = (vbits_i(t) - vbits_i(magic)) << 23;
  vf e = vbits_f(vbits_i(p) + shift);
  e = vselect(tiny, vf{}, e);
  return vselect(x != x, x, e);  // NaN in, NaN out
}
#endif

// x = 2^k m, m in [sqrt(1/2), sqrt(2)), degree-9 polynomial in m - 1 (normal numbers).
inline vf vlog_positive(vf x) {
  const vi bits = vbits_i(x);
  vi k = ((bits >> 23) & 0x1ff) - 126;
  vf m = vbits_f((bits & 0x007fffff) | 0x3f000000);
  const vi small = m < vsplat(0.707106781186547524f);
  k = k + small;  // (true lanes are -1)
  m = vselect(small, m + m - vsplat(1.0f), m - vsplat(1.0f));
  const vf z = m * m;
  vf y = vsplat(7.0376836292e-2f);
  y = vfma(y, m, vsplat(-1.1514610310e-1f));
  y = vfma(y, m, vsplat(1.1676998740e-1f));
  y = vfma(y, m, vsplat(-1.2420140846e-1f));
  y = vfma(y, m, vsplat(1.4249322787e-1f));
  y = vfma(y, m, vsplat(-1.6668057665e-1f));
  y = vfma(y, m, vsplat(2.0000714765e-1f));
  y = vfma(y, m, vsplat(-2.4999993993e-1f));
  y = vfma(y, m, vsplat(3.3333331174e-1f));
  y = y * m * z;
  const vf kf = __builtin_convertvector(k, vf);
  y = vfma(kf, vsplat(-2.12194440e-4f), y);
  y = vfma(z, vsplat(-0.5f), y);
  vf r = m + y;
  r = vfma(kf, vsplat(0.693359375f), r);
  return vselect(x != x, x, r);
}

// The discriminator terms of one pixel vector from one exp and one division: with e = exp(-|z|) in (0, 1],
// sigmoid(z) = 1 / (1 + e) for z >= 0, e / (1 + e) otherwise (exact 0.5 at z = 0, 0 for very negative z);
// BCE(z, t) = (1 - t) z - log_sigmoid(z), log_sigmoid(z) = min(z, 0) - log1p(e): PyTorch's formula. log1p(e) =
// 2 atanh(s), s = e / (2 + e) in (0, 1/3]: the odd series to s^13 (truncation < 2e-8 relative), exact for tiny
// e without a correction step. 1 / (1 + e) and 1 / (2 + e) both come from q = 1 / ((1 + e)(2 + e)).
struct DiscTerms {
  vf sigmoid, bce;
};

inline DiscTerms vdisc_terms(vf z, vf e, vf t) {
  const vf w1 = vsplat(1.0f) + e, w2 = vsplat(2.0f) + e;
  const vf q = vsplat(1.0f) / (w1 * w2);
  const vf sv = e * (w1 * q);
  const vf s2 = sv * sv;
  vf p = vsplat(1.0f / 13.0f);
  p = vfma(p, s2, vsplat(1.0f / 11.0f));
  p = vfma(p, s2, vsplat(1.0f / 9.0f));
  p = vfma(p, s2, vsplat(1.0f / 7.0f));
  p = vfma(p, s2, vsplat(1.0f / 5.0f));
  p = vfma(p, s2, vsplat(1.0f / 3.0f));
  const vf log1p_e = vfma(p * s2, sv, sv) * vsplat(2.0f);
  const vf m = vselect(z < vf{}, z, vf{});
  const vf log_sig = vselect(z != z, z, m) - log1p_e;
  return {vselect(z >= vf{}, vsplat(1.0f), e) * (w2 * q), (vsplat(1.0f) - t) * z - log_sig};
}

inline vf vexp_neg_abs(vf z) { return vexp_nonpositive(vbits_f(vbits_i(z) | vsplat_i(INT32_MIN))); }  // -|z|

// The sum of v's lanes, as a tree in a fixed order (halves added, then their halves, ...).
inline float vhsum(vf v) {
#if defined(FAS_HAS_AVX512)
  v += __builtin_shuffle(v, vi{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, vi{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, vi{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, vi{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
#elif defined(FAS_HAS_AVX2_FMA)
  v += __builtin_shuffle(v, vi{4, 5, 6, 7, 0, 1, 2, 3});
  v += __builtin_shuffle(v, vi{2, 3, 0, 1, 6, 7, 4, 5});
  v += __builtin_shuffle(v, vi{1, 0, 3, 2, 5, 4, 7, 6});
#else
  v += __builtin_shuffle(v, vi{2, 3, 0, 1});
  v += __builtin_shuffle(v, vi{1, 0, 3, 2});
#endif
  return v[0];
}

// p[0..n) = the first n lanes of v (n <= kV): the last, partial vector of an output that has no padding.
inline void vstore_n(float* p, vf v, int64_t n) {
  if (n >= kV) {
    vstore(p, v);
  } else {
    float tmp[kV];
    vstore(tmp, v);
    std::memcpy(p, tmp, static_cast<size_t>(n) * sizeof(float));
  }
}

// float16 / bfloat16 pixel vectors in memory: the conversions of dtypes.h, lane by lane (bit-identical to them).
typedef uint16_t vh __attribute__((vector_size(2 * kV)));
typedef uint32_t vu __attribute__((vector_size(4 * kV)));

inline vf vhalf_to_float(vh h) {
  const vu x = __builtin_convertvector(h, vu);
  const vu em = (x & 0x7fffu) << 13;  // exponent and mantissa in float position
  vu mag = (vu)((vf)em * vsplat(0x1p112f));  // rebias 15 -> 127 (also turns subnormal halves into normal floats)
  mag = em >= (0x7c00u << 13) ? (em | 0x7f800000u) : mag;  // inf and NaN keep an all-ones exponent
  return (vf)(mag | ((x & 0x8000u) << 16));
}

inline vh vfloat_to_half(vf f) {  // round to nearest even
  const vu x = (vu)f;
  const vu sign = (x >> 16) & 0x8000u;
  const vu ax = x & 0x7fffffffu;
  const vu normal = (ax + 0xc8000fffu + ((ax >> 13) & 1u)) >> 13;
  const vu subnormal = (vu)((vf)ax + vsplat(0.5f)) - 0x3f000000u;
  vu r = ax < 0x38800000u ? subnormal : normal;
  r = ax >= 0x477ff000u ? (vu{} + 0x7c00u) : r;
  r = ax > 0x7f800000u ? (vu{} + 0x7e00u) : r;
  return __builtin_convertvector(r | sign, vh);
}

inline vf vbf16_to_float(vh h) { return (vf)(__builtin_convertvector(h, vu) << 16); }

inline vh vfloat_to_bf16(vf f) {  // round to nearest even; NaN stays (a quiet) NaN
  const vu x = (vu)f;
  vu r = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  r = (x & 0x7fffffffu) > 0x7f800000u ? ((x >> 16) | 0x40u) : r;
  return __builtin_convertvector(r, vh);
}

template <class Tag> struct VecIO;
template <> struct VecIO<Float32> {
  static vf load(const float* p) { return vload(p); }
  static void store(float* p, vf v) { vstore(p, v); }
};
// 16-bit storage: load 16-bit lanes and widen, or narrow and store them.
template <vf (*kToFloat)(vh), vh (*kFromFloat)(vf)>
struct VecIO16 {
  static vf load(const uint16_t* p) {
    vh h;
    std::memcpy(&h, p, sizeof h);
    return kToFloat(h);
  }
  static void store(uint16_t* p, vf v) {
    const vh h = kFromFloat(v);
    std::memcpy(p, &h, sizeof h);
  }
};
template <> struct VecIO<Float16> : VecIO16<vhalf_to_float, vfloat_to_half> {};
template <> struct VecIO<BFloat16> : VecIO16<vbf16_to_float, vfloat_to_bf16> {};

// Channel rows of a block as the vector loops see them: the tensor itself in its storage type (Tag), or the
// float32 scratch (Tag = Float32).
template <class Tag>
struct Rows {
  using S = typename Tag::S;
  S* p;
  int64_t sc;
  vf load(int64_t off) const { return VecIO<Tag>::load(p + off); }
  void store(int64_t off, vf v) const { VecIO<Tag>::store(p + off, v); }
};

constexpr int64_t kMapsBlock = 2048;  // pixels per block of the maps-only pre-pass
constexpr int64_t kMaxBlock = 128;  // pixels per block (a block and its per-pixel arrays stay in L1 for C ~ 20)
constexpr int64_t kScratchFloats = 8192;  // target size of one [C][B] float32 block (32 KiB): B shrinks for large C
constexpr int64_t kSerialBelow = 32768;  // elements below which one thread does all the work

// The block decomposition of an (N, ., H, W) pixel grid; a function of the shape and layout only.
struct Geometry {
  int64_t N, H, W;
  bool merged;       // H and W form one pixel axis of stride sW in every tensor
  int64_t L;         // pixels per row
  int64_t B;         // pixels per block
  int64_t BS;        // scratch row stride (B rounded up to 16)
  int64_t per_row;   // blocks per row
  int64_t nblocks;

  // by_rows: blocks never cross a row (the resizing kernels compute a row from its two low-resolution rows)
  Geometry(int64_t N_, int64_t C, int64_t H_, int64_t W_, std::initializer_list<const Tensor4*> tensors,
           int64_t max_block = kMaxBlock, bool by_rows = false)
      : N(N_), H(H_), W(W_) {
    merged = !by_rows;
    for (const Tensor4* t : tensors)
      if (t && t->ptr && H > 1 && t->sH != W * t->sW) merged = false;
    L = merged ? H * W : W;
    const int64_t rows = merged ? N : N * H;
    B = std::max<int64_t>(8, std::min<int64_t>(max_block, kScratchFloats / std::max<int64_t>(C, 1)));
    if (B >= 16) B = B / 16 * 16;  // whole pixel vectors: full blocks of float32 rows are read in place
    B = std::min<int64_t>(B, std::max<int64_t>(L, 1));
    BS = (B + 15) / 16 * 16;
    per_row = L > 0 ? (L + B - 1) / B : 0;
    nblocks = rows * per_row;
  }

  // First pixel (n, h, w) and length of block `blk`.
  inline void block(int64_t blk, int64_t& n, int64_t& h, int64_t& w, int64_t& len) const {
    const int64_t row = blk / per_row;
    const int64_t j0 = (blk % per_row) * B;
    len = std::min(B, L - j0);
    if (merged) {
      n = row;
      h = j0 / W;
      w = j0 % W;
    } else {
      n = row / H;
      h = row % H;
      w = j0;
    }
  }
};

inline int64_t offset(const Tensor4& t, int64_t n, int64_t h, int64_t w) { return n * t.sN + h * t.sH + w * t.sW; }

// The lines of pixels [j0, j0 + len) of an (N, H, W) map whose rows merge (the common case; else nothing).
template <class E>
inline void prefetch_map(const Map3& m, int64_t H, int64_t W, int64_t j0, int64_t len) {
  if (!m.ptr || !(H == 1 || m.s1 == W * m.s2) || m.s0 != H * W * m.s2 || m.s2 != 1) return;
  const char* p = static_cast<const char*>(m.ptr) + j0 * static_cast<int64_t>(sizeof(E));
  for (int64_t o = 0; o < len * static_cast<int64_t>(sizeof(E)); o += 64) __builtin_prefetch(p + o, 0, 3);
}

// buf[c * BS + b] = float(t[pixel b of the block, channel c]); the pixel stride within a block is t.sW.
template <class Tag>
void load_block(const Tensor4& t, int64_t base, int64_t C, int64_t len, int64_t BS, float* buf) {
  using S = typename Tag::S;
  const S* p = static_cast<const S*>(t.ptr) + base;
  const int64_t sC = t.sC, sP = t.sW;
  if (sP == 1) {
    for (int64_t c = 0; c < C; ++c) {
      const S* pc = p + c * sC;
      float* bc = buf + c * BS;
      for (int64_t b = 0; b < len; ++b) bc[b] = Tag::load(pc[b]);
    }
  } else if (sC == 1) {
    for (int64_t b = 0; b < len; ++b) {
      const S* pb = p + b * sP;
      for (int64_t c = 0; c < C; ++c) buf[c * BS + b] = Tag::load(pb[c]);
    }
  } else {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t b = 0; b < len; ++b) buf[c * BS + b] = Tag::load(p[c * sC + b * sP]);
  }
}

// t[pixel b, channel c] = buf[c * BS + b], converted to t's dtype: the inverse of load_block.
template <class Tag>
void store_block(const Tensor4& t, int64_t base, int64_t C, int64_t len, int64_t BS, const float* buf) {
  using S = typename Tag::S;
  S* p = static_cast<S*>(t.ptr) + base;
  const int64_t sC = t.sC, sP = t.sW;
  if (sP == 1) {
    for (int64_t c = 0; c < C; ++c) {
      S* pc = p + c * sC;
      const float* bc = buf + c * BS;
      for (int64_t b = 0; b < len; ++b) pc[b] = Tag::store(bc[b]);
    }
  } else {
    for (int64_t b = 0; b < len; ++b) {
      S* pb = p + b * sP;
      for (int64_t c = 0; c < C; ++c) pb[c * sC] = Tag::store(buf[c * BS + b]);
    }
  }
}

// Whether the vector loops can read / write a block of t in place, in t's own dtype (Rows<Tag>): unit pixel
// stride and whole pixel vectors. Otherwise the block goes through the float32 scratch (Rows<Float32>): the input
// converted by load_padded, the output stored (and converted) by store_block.
inline bool rows_in_place(const Tensor4& t, int64_t len) { return t.sW == 1 && len % kV == 0; }

// load_block, plus zeros in the padding lanes up to a whole pixel vector (finite values, results never stored).
template <class Tag>
void load_padded(const Tensor4& t, int64_t base, int64_t C, int64_t len, int64_t BS, float* buf) {
  load_block<Tag>(t, base, C, len, BS, buf);
  const int64_t padded = (len + kV - 1) / kV * kV;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t b = len; b < padded; ++b) buf[c * BS + b] = 0.f;
}

template <class Tag>
Rows<Tag> tensor_rows(const Tensor4& t, int64_t base) {
  return {t.ptr ? static_cast<typename Tag::S*>(t.ptr) + base : nullptr, t.sC};
}

#if defined(FAS_HAS_AVX512)
// The float32 output rows of a block (a loss gradient; softmax2d's y and grad_x) written with non-temporal
// (streaming) stores: whole 64-byte lines go to memory without first being read for ownership, and without
// evicting what the loop reads. A pixel vector is one line but its rows are rarely line-aligned (an odd H*W puts
// channel c at c*4 bytes past a boundary), so each channel's line is assembled from the tail of its previous
// vector and the head of this one (one permute); the partial lines at either end of a run of blocks, which a
// neighbouring run shares, get ordinary masked stores.
// Why: a fresh output buffer is memory the allocator just took back from other work, its lines often still
// dirty in another core's cache; an ordinary store must first fetch each line for ownership. Measured on the
// 2-core EPYC VM, 2x21x321x321 float32, each call right after the eager reference's, the same build with and
// without streaming alternated in one process (inputs rotated per variant): labelled generator_loss
// forward+backward 3.43 -> 3.06 ms and 2.80 -> 2.71 ms, softmax2d forward+backward 3.82 -> 3.02 ms; the fused
// kernel alone stayed at ~2.0 ms where ordinary stores swung between 1.8 and 3.0 ms. When the buffer is cold and
// clean ordinary stores were ~7% faster. Only for outputs too large to stay in cache (stream_bytes(), kernels.cpp:
// on a CPU whose last-level cache holds input and output, ordinary stores were faster).
struct StreamRows {
  float* p;
  int64_t sc;
  float* prev;         // [C][kV]: the last pixel vector put in each channel (kept from block to block)
  const int32_t* lead; // [C]: pixels of each row before its first line boundary in this block (0..kV-1)
  bool cont;           // the previous block of this row was streamed just before, by this thread: prev holds
                       // its last vectors, and the line it left unfinished is completed here
  bool ends;           // no streamed block of this thread follows in this row: finish() stores the rest

  static StreamRows make(float* p, int64_t sc, int64_t C, float* prev, int32_t* lead, bool cont, bool ends) {
    for (int64_t c = 0; c < C; ++c)
      lead[c] = static_cast<int32_t>((kV - (reinterpret_cast<uintptr_t>(p + c * sc) / sizeof(float)) % kV) % kV);
    return {p, sc, prev, lead, cont, ends};
  }
  // Pixel vector v (pixels v*kV .. v*kV + kV - 1 of the block) of channel c; vectors of a channel in order.
  void put(int64_t c, int64_t v, vf g) const {
    float* row = p + c * sc;
    const int s = lead[c];
    if (s == 0) {
      _mm512_stream_ps(row + v * kV, (__m512)g);
      return;
    }
    if (v == 0 && !cont) {  // the line before the first boundary: shared with a block another run may write
      _mm512_mask_storeu_ps(row, static_cast<__mmask16>((1u << s) - 1u), (__m512)g);
    } else {  // the line [v*kV - kV + s, v*kV + s): lanes s.. of the previous vector, then lanes ..s-1 of this one
      const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(s), _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7,
                                                                                   6, 5, 4, 3, 2, 1, 0));
      _mm512_stream_ps(row + v * kV - kV + s, _mm512_permutex2var_ps(_mm512_loadu_ps(prev + c * kV), idx, (__m512)g));
    }
    _mm512_storeu_ps(prev + c * kV, (__m512)g);
  }
  // The rest of each row after the last whole line, lanes lead.. of the last vector (nvec vectors were put),
  // unless the next block completes that line.
  void finish(int64_t C, int64_t nvec) const {
    if (!ends) return;
    for (int64_t c = 0; c < C; ++c) {
      const int s = lead[c];
      if (s != 0)
        _mm512_mask_storeu_ps(p + c * sc + (nvec - 1) * kV, static_cast<__mmask16>(~((1u << s) - 1u)),
                              _mm512_loadu_ps(prev + c * kV));
    }
  }
};
constexpr bool kCanStream = true;
#else
struct StreamRows {  // (no streaming stores in this build: never used)
  float* p;
  int64_t sc;
  static StreamRows make(float* p, int64_t sc, int64_t, float*, int32_t*, bool, bool) { return {p, sc}; }
  void put(int64_t, int64_t, vf) const {}
  void finish(int64_t, int64_t) const {}
};
constexpr bool kCanStream = false;
#endif

// A block of a tensor in memory, for prefetch_rows: `lines` lines `line_stride` bytes apart cover 16 pixels, and
// the next 16 pixels start 16 * `px_bytes` bytes on (NCHW rows: C rows; channels_last: consecutive lines).
struct BlockLines {
  const char* mem = nullptr;  // nullptr: a layout prefetch_rows does not follow
  int64_t lines = 0, line_stride = 0, px_bytes = 0;
};

inline BlockLines block_lines(const Tensor4& t, int64_t base, int64_t C) {
  BlockLines r;
  const int64_t elem = t.dtype == kFloat32 ? 4 : 2;
  if (!t.ptr) return r;
  if (t.sW == 1) {
    r.mem = static_cast<const char*>(t.ptr) + base * elem;
    r.lines = C;
    r.line_stride = t.sC * elem;
    r.px_bytes = elem;
  } else if (t.sC == 1 && t.sW == C) {
    r.mem = static_cast<const char*>(t.ptr) + base * elem;
    r.lines = (16 * C * elem + 63) / 64;
    r.line_stride = 64;
    r.px_bytes = C * elem;
  }
  return r;
}

// Blocks ahead that the loops prefetch (2 measured ~7% faster than 1 and than 4 on the fused kernel).
constexpr int64_t kAhead = 2;

// The lines of r's next 16 pixels `ahead` pixels on: called every 16 pixels of a block with ahead = kAhead * B,
// it asks for a block the thread computes soon (its own within a run of blocks, where rows merge), spread over
// the loop so that the requests do not queue at once.
// A block reads C interleaved strided streams, which the hardware prefetchers do not follow well: without this
// the fused kernel waited on memory most of the time (perf: ~40% of its samples on one load of the max pass).
template <bool kWrite>
inline void prefetch_rows(const BlockLines& r, int64_t b, int64_t ahead) {
  if (!r.mem || b % 16 != 0) return;
  const char* p = r.mem + (b + ahead) * r.px_bytes;
  // Reads go to L2 (prefetcht1: its miss queue is deeper than L1's, and the loop's loads hit L2 in time), the
  // gradient's lines to L1 for writing (prefetchw). Measured: ~13% faster than L1 for both, and dropping the
  // write prefetch was slower.
  if (kWrite) {
    for (int64_t k = 0; k < r.lines; ++k) __builtin_prefetch(p + k * r.line_stride, 1, 3);
  } else {
    for (int64_t k = 0; k < r.lines; ++k) __builtin_prefetch(p + k * r.line_stride, 0, 2);
  }
}

// out[b] = m[pixel j0 + b] for a flat pixel index j0 over (N, H, W), converted to O. One strided loop when the
// map's H and W (and N) axes merge, else (n, h, w) stepping.
template <class E, class O>
void gather_map(const Map3& m, int64_t H, int64_t W, int64_t j0, int64_t len, O* out) {
  const E* p = static_cast<const E*>(m.ptr);
  const bool rows_merge = H == 1 || m.s1 == W * m.s2;  // (a size-1 axis may have any stride)
  if (rows_merge && (m.s0 == H * W * m.s2 || (j0 % (H * W)) + len <= H * W)) {
    const int64_t n = j0 / (H * W);
    const E* q = p + n * m.s0 + (j0 - n * H * W) * m.s2;
    const int64_t st = m.s2;
    if (st == 1) {  // the common case, as a plain (vectorised) copy
      for (int64_t b = 0; b < len; ++b) out[b] = static_cast<O>(q[b]);
    } else {
      for (int64_t b = 0; b < len; ++b) out[b] = static_cast<O>(q[b * st]);
    }
    return;
  }
  int64_t n = j0 / (H * W), h = (j0 % (H * W)) / W, w = j0 % W;
  for (int64_t b = 0; b < len; ++b) {
    out[b] = static_cast<O>(p[n * m.s0 + h * m.s1 + w * m.s2]);
    if (++w == W) {
      w = 0;
      if (++h == H) {
        h = 0;
        ++n;
      }
    }
  }
}

inline int threads_for(int num_threads, int64_t work) {
  return work < kSerialBelow ? 1 : std::max(1, num_threads);
}

// Where a block sits in the run of consecutive blocks one thread computes in a row (StreamRows carries its
// partial lines from one block to the next within a run).
struct RunPos {
  bool first, last;
};

// Runs body(block, scratch) -- or body(block, scratch, RunPos) -- for every block; each thread owns one scratch
// of `scratch_floats` floats.
template <class Body>
void for_blocks(int64_t nblocks, int nthreads, int64_t scratch_floats, const Body& body) {
  // Runs of consecutive blocks handed out dynamically: within a run the blocks a thread prefetches are its own
  // next ones (and StreamRows carries lines from block to block), and a thread slowed down by something else on
  // the machine does not hold the others up (measured: static scheduling lost up to ~20% right after other
  // memory-heavy work). Sums do not depend on who ran what.
  const int64_t run = std::max<int64_t>(1, std::min<int64_t>(32, nblocks / (8 * std::max(nthreads, 1))));
  const int64_t nruns = (nblocks + run - 1) / run;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && nblocks > 1)
  {
    std::vector<float> scratch(static_cast<size_t>(scratch_floats));
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t r = 0; r < nruns; ++r) {
      const int64_t end = std::min(nblocks, (r + 1) * run);
      for (int64_t blk = r * run; blk < end; ++blk) {
        if constexpr (std::is_invocable_v<const Body&, int64_t, float*, RunPos>) {
          body(blk, scratch.data(), RunPos{blk == r * run, blk + 1 == end});
        } else {
          body(blk, scratch.data());
        }
      }
    }
#if defined(FAS_HAS_AVX512)
    _mm_sfence();  // streamed stores (StreamRows) are weakly ordered: make them visible before the region ends
#endif
  }
}

// Sums partial[k * nblocks + blk] over blk in block order (deterministic, thread-count independent).
std::vector<double> sum_blocks(const std::vector<double>& partial, int64_t nblocks, int nsums) {
  std::vector<double> out(nsums, 0.0);
  for (int k = 0; k < nsums; ++k)
    for (int64_t blk = 0; blk < nblocks; ++blk) out[k] += partial[k * nblocks + blk];
  return out;
}

constexpr int64_t kFusedMaps = 10;  // per-pixel arrays of fused_block before its [C][kV] exp buffer, in BS floats

// Where the vector loops put a gradient vector: in place (Rows) or streamed (StreamRows).
template <class Tag>
inline void put_vec(const Rows<Tag>& r, int64_t c, int64_t, int64_t b, vf x) { r.store(b + c * r.sc, x); }
inline void put_vec(const StreamRows& r, int64_t c, int64_t v, int64_t, vf x) { r.put(c, v, x); }

// Whether an output of `elements` values is streamed where its rows are in place (see StreamRows).
inline bool streams(const Tensor4& out, int64_t elements) {
  return kCanStream && out.ptr && out.dtype == kFloat32 && elements * 4 >= stream_bytes() &&
         reinterpret_cast<uintptr_t>(out.ptr) % sizeof(float) == 0;  // (lines made of whole floats)
}

// Floats of a thread's scratch that block_stream uses: [C][kV] last vectors and [C] leads (see StreamRows).
inline int64_t stream_scratch(int64_t C) { return C * (kV + 1); }

// The StreamRows of block `blk`'s output rows (`out` at `base`; `scratch`: stream_scratch(C) floats of the
// thread's scratch, kept from block to block): it continues the line its predecessor in the run left open, and
// leaves one open when its successor in the run is streamed too (a full block: rows_in_place holds for it as for
// this one).
inline StreamRows block_stream(const Tensor4& out, int64_t base, int64_t C, const Geometry& g, int64_t blk,
                               int64_t len, RunPos pos, float* scratch) {
  float* prev = scratch;
  int32_t* lead = reinterpret_cast<int32_t*>(prev + C * kV);
  const int64_t j0 = blk % g.per_row * g.B;  // the block's first pixel in its row; the next block's length:
  const int64_t next_len = std::min(g.B, g.L - j0 - len);
  const bool cont = !pos.first && j0 > 0, ends = pos.last || next_len <= 0 || next_len % kV != 0;
  return StreamRows::make(static_cast<float*>(out.ptr) + base, out.sC, C, prev, lead, cont, ends);
}

// ---- Bilinear resizing fused into the kernels (F.interpolate(x, size, mode="bilinear", align_corners)) --------
//
// Logits at (h, w) are seen at (H, W) one row at a time: full-resolution row r is l0[r] X[i0[r]] + l1[r] X[i1[r]],
// where X[i] is low-resolution row i already resized along W ([C][W]; PyTorch's order: W, then H). A thread keeps
// the two X rows its current row needs, so a low row is resized along W about once, not once per full row.
// The gradient takes the transposed way: a full row's gradient is added, times the same two weights, into the
// accumulators of its two low rows (vector adds along the row), and a low row none of the remaining rows reads is
// transposed along W once, into (C, w). Rows are cut into chunks fixed by the shape, each chunk computed in order
// by one thread; a low row that rows of several chunks read gets one partial result per chunk, and a last pass adds
// them in chunk order. Every sum has a fixed order, whatever thread computed what: bit-identical across runs and
// thread counts, no atomics. Full-resolution logits and gradients exist only as a block and four [C][W] rows per
// thread. D maps (one channel) are resized per pixel from two cached W-resized rows; their gradient is transposed
// along W per full row and gathered along H after the pass.

// a * b + c, fused where the build's vfma is (so that a lane computed alone rounds as a vector lane does)
inline float sfma(float a, float b, float c) {
#if defined(FAS_HAS_AVX2_FMA)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// The two halves of a resize along one axis in pixel vectors.
// Forward: output vector v (outputs v kV .. v kV + kV - 1) reads inputs base[v] + idx0 / idx1 (lanes), when they all
// lie in one vector of inputs from base[v] (fits[v]; upsampling), by two permutes of one load; else lane by lane.
// Adjoint, as a gather: input j sums the outputs that read it, first[j] .. last[j], times their weights
// (taps[at[j] ...]: m0 and / or m1 of each, whole vectors; lanes past last[j] are selected out, not multiplied by
// 0: a NaN there stays out, as in PyTorch, where a NaN reaches the inputs its output reads, also through a weight
// of 0).
struct AxisPlan {
  const ResizeAxis* a = nullptr;
  std::vector<int64_t> base;
  std::vector<int32_t> idx0, idx1;  // [nv][kV] (plain arrays: vector types in a std::vector lose their alignment)
  std::vector<uint8_t> fits;
  std::vector<int64_t> at, vecs;
  std::vector<float> taps;

  AxisPlan() = default;
  explicit AxisPlan(const ResizeAxis& ax) : a(&ax) {
    const int64_t out = ax.out, in = ax.in, nv = (out + kV - 1) / kV;
    base.assign(nv, 0);
    idx0.assign(nv * kV, 0);
    idx1.assign(nv * kV, 0);
    fits.assign(nv, 0);
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t q0 = v * kV, q1 = std::min(out, q0 + kV) - 1;
      base[v] = ax.i0[q0];
      fits[v] = ax.i1[q1] - base[v] < kV;
      for (int k = 0; k < kV; ++k) {
        const int64_t q = std::min(q0 + k, q1);
        idx0[v * kV + k] = static_cast<int32_t>(std::min<int64_t>(ax.i0[q] - base[v], kV - 1));
        idx1[v * kV + k] = static_cast<int32_t>(std::min<int64_t>(ax.i1[q] - base[v], kV - 1));
      }
    }
    at.assign(in, 0);
    vecs.assign(in, 0);
    for (int64_t j = 0; j < in; ++j) {
      at[j] = static_cast<int64_t>(taps.size());
      if (ax.first[j] > ax.last[j]) continue;
      vecs[j] = (ax.last[j] - ax.first[j] + kV) / kV;
      taps.resize(taps.size() + vecs[j] * kV, 0.f);
      for (int64_t q = ax.first[j]; q <= ax.last[j]; ++q) {
        // (both taps on one input: the last one, or an axis that keeps its size; PyTorch adds the two products)
        const double wq = (ax.i0[q] == j ? static_cast<double>(ax.l0[q]) : 0.0) +
                          (ax.i1[q] == j ? static_cast<double>(ax.l1[q]) : 0.0);
        taps[at[j] + q - ax.first[j]] = static_cast<float>(wq);
      }
    }
  }

  // out[q] = in[i0[q]] l0[q] + in[i1[q]] l1[q], q < out; `in` readable kV floats past its last input.
  void resize(const float* in, float* out) const {
    const ResizeAxis& ax = *a;
    const int64_t n = ax.out, nv = (n + kV - 1) / kV;
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t q0 = v * kV;
      if (fits[v] && q0 + kV <= n) {
        const vf x = vload(in + base[v]);
        const vf y = vfma(__builtin_shuffle(x, vload_i(idx1.data() + v * kV)), vload(ax.l1.data() + q0),
                          __builtin_shuffle(x, vload_i(idx0.data() + v * kV)) * vload(ax.l0.data() + q0));
        vstore(out + q0, y);
      } else {
        for (int64_t q = q0; q < std::min(n, q0 + kV); ++q)
          out[q] = sfma(in[ax.i1[q]], ax.l1[q], in[ax.i0[q]] * ax.l0[q]);
      }
    }
  }

  // The adjoint at input j: sum over the outputs q that read it of row[q] times its weight; `row` readable kV
  // floats past its last output.
  float gather(const float* row, int64_t j) const {
    const float* tj = taps.data() + at[j];
    const float* pj = row + a->first[j];
    const int32_t len = static_cast<int32_t>(a->last[j] - a->first[j] + 1);
    vi lane;
    for (int k = 0; k < kV; ++k) lane[k] = k;
    vf acc = vf{};
    for (int64_t v = 0; v < vecs[j]; ++v) {
      const vi in_taps = lane < vsplat_i(len - static_cast<int32_t>(v * kV));
      acc = vfma(vselect(in_taps, vload(pj + v * kV), vf{}), vload(tj + v * kV), acc);
    }
    return vhsum(acc);
  }
  void transpose(const float* row, float* out) const {
    for (int64_t j = 0; j < a->in; ++j) out[j] = gather(row, j);
  }
};

// The per-call plan of a resized (N, C, h, w) tensor: its two axes, the chunks of full rows and the slots of the
// partial low rows (per image: low row i has slots off[i] .. off[i + 1] - 1, one per chunk from kfirst[i] on).
struct RowResize {
  const ResizeAxis& ah;  // h -> H
  const ResizeAxis& aw;  // w -> W
  AxisPlan pw;           // along W
  int64_t N, C, H, W, h, w;
  int64_t xs;          // row stride of the [C][xs] rows: W padded, so that a block's last pixel vector stays inside
  int64_t ls;          // row stride of a low row: w padded (the forward resize reads a whole vector)
  int64_t chunk_rows, chunks;  // full rows per chunk, chunks per image
  int64_t slots;       // partial low rows per image
  std::vector<int64_t> kfirst, off;

  RowResize(const ResizeAxis& ah_, const ResizeAxis& aw_, int64_t N_, int64_t C_)
      : ah(ah_), aw(aw_), pw(aw_), N(N_), C(C_), H(ah_.out), W(aw_.out), h(ah_.in), w(aw_.in) {
    xs = (W + 15) / 16 * 16 + 16;
    ls = (w + 15) / 16 * 16 + 16;
    // two low rows' worth of full rows at least, so that most low rows are complete in one chunk
    const int64_t per_low = (H + h - 1) / std::max<int64_t>(h, 1);
    chunk_rows = std::min<int64_t>(std::max<int64_t>(H, 1), std::max<int64_t>(16, 2 * per_low));
    chunks = (H + chunk_rows - 1) / chunk_rows;
    kfirst.assign(h, 0);
    off.assign(h + 1, 0);
    for (int64_t i = 0; i < h; ++i) {
      const bool read = ah.first[i] <= ah.last[i];
      kfirst[i] = read ? ah.first[i] / chunk_rows : 0;
      off[i + 1] = off[i] + (read ? ah.last[i] / chunk_rows - kfirst[i] + 1 : 0);
    }
    slots = off[h];
  }
  float* partial(float* P, int64_t n, int64_t i, int64_t k) const {
    return P + (n * slots + off[i] + k - kfirst[i]) * C * w;
  }
  // floats of a thread's row scratch (at an even float offset): keys, two X rows, two gradient rows, a low row
  int64_t scratch(bool grad) const { return 8 + (grad ? 4 : 2) * C * xs + C * ls; }
};

// The rows of a thread's row scratch (RowResize::scratch), `s` at its start. The keys (n * h + i + 1 of the low row a
// row holds, 0 for none) stay with the thread's scratch from chunk to chunk: X rows are reused across chunks. The
// padding of every row is never written: it stays the zeros of the fresh scratch (finite lanes).
struct ThreadRows {
  int64_t* xkey;  // [2]
  int64_t* ukey;  // [2]
  float* x[2];
  float* u[2];
  float* low;  // [C][ls]
  ThreadRows(float* s, const RowResize& rr, bool grad) {
    xkey = reinterpret_cast<int64_t*>(s);
    ukey = xkey + 2;
    float* p = s + 8;
    const int64_t row = rr.C * rr.xs;
    x[0] = p;
    x[1] = p + row;
    p += 2 * row;
    u[0] = grad ? p : nullptr;
    u[1] = grad ? p + row : nullptr;
    p += grad ? 2 * row : 0;
    low = p;
  }
};

// The slot holding `key`, else one that does not hold `keep` (fresh: the caller fills it).
inline int slot_of(int64_t* keys, int64_t key, int64_t keep, bool& fresh) {
  fresh = false;
  if (keys[0] == key) return 0;
  if (keys[1] == key) return 1;
  fresh = true;
  const int s = keys[0] == keep ? 1 : 0;
  keys[s] = key;
  return s;
}

// out ([C][xs]) = low row i of image n of x, resized along W.
template <class Tag>
void resize_low_row(const Tensor4& x, const RowResize& rr, int64_t n, int64_t i, float* low, float* out) {
  load_block<Tag>(x, offset(x, n, i, 0), rr.C, rr.w, rr.ls, low);
  for (int64_t c = 0; c < rr.C; ++c) rr.pw.resize(low + c * rr.ls, out + c * rr.xs);
}

// The gradient accumulated for one low row (u, [C][xs]) transposed along W into dst ([C][w]).
inline void transpose_low_row(const RowResize& rr, const float* u, float* dst) {
  for (int64_t c = 0; c < rr.C; ++c) rr.pw.transpose(u + c * rr.xs, dst + c * rr.w);
}

// What the blocks of one resized row read and write instead of the tensors (fields unused when that tensor is not
// resized).
struct RowCtx {
  const float* xw0 = nullptr;  // the row's two low rows resized along W, [C][xs]
  const float* xw1 = nullptr;
  float l0 = 1.f, l1 = 0.f;    // their weights
  int64_t xs = 0;
  float* u0 = nullptr;         // their gradient accumulators, [C][xs] (nullptr: no gradient)
  float* u1 = nullptr;
  float* gz = nullptr;         // the row's D-map gradient, [W] (+ kV readable)
};

// Row r of image n reads low rows i0[r], i1[r]: their X rows (resized along W when not held already).
template <class Tag>
void enter_x_row(const Tensor4& x, const RowResize& rr, ThreadRows& t, int64_t n, int64_t r, RowCtx& rc) {
  const int64_t key0 = n * rr.h + rr.ah.i0[r] + 1, key1 = n * rr.h + rr.ah.i1[r] + 1;
  bool fresh;
  const int s0 = slot_of(t.xkey, key0, key1, fresh);
  if (fresh) resize_low_row<Tag>(x, rr, n, rr.ah.i0[r], t.low, t.x[s0]);
  const int s1 = slot_of(t.xkey, key1, key0, fresh);
  if (fresh) resize_low_row<Tag>(x, rr, n, rr.ah.i1[r], t.low, t.x[s1]);
  rc.xw0 = t.x[s0];
  rc.xw1 = t.x[s1];
  rc.l0 = rr.ah.l0[r];
  rc.l1 = rr.ah.l1[r];
  rc.xs = rr.xs;
}

// Row r (of chunk k of image n) adds its gradient into the accumulators of low rows i0[r], i1[r] (zeroed when
// new), after the accumulators of the low rows no later row of the chunk reads (below i0[r]: i0 never decreases)
// have been transposed into their partial slots.
inline void enter_grad_row(const RowResize& rr, ThreadRows& t, float* P, int64_t n, int64_t k, int64_t r,
                           RowCtx& rc) {
  const int64_t key0 = n * rr.h + rr.ah.i0[r] + 1, key1 = n * rr.h + rr.ah.i1[r] + 1;
  for (int s = 0; s < 2; ++s)
    if (t.ukey[s] && t.ukey[s] < key0) {
      transpose_low_row(rr, t.u[s], rr.partial(P, n, t.ukey[s] - 1 - n * rr.h, k));
      t.ukey[s] = 0;
    }
  bool fresh;
  const int u0 = slot_of(t.ukey, key0, key1, fresh);
  if (fresh) std::fill(t.u[u0], t.u[u0] + rr.C * rr.xs, 0.f);
  const int u1 = slot_of(t.ukey, key1, key0, fresh);
  if (fresh) std::fill(t.u[u1], t.u[u1] + rr.C * rr.xs, 0.f);
  rc.u0 = t.u[u0];
  rc.u1 = t.u[u1];
  rc.l0 = rr.ah.l0[r];
  rc.l1 = rr.ah.l1[r];
  rc.xs = rr.xs;
}

// Transposes every accumulator still open (end of chunk k) into its partial slot.
inline void leave_chunk(const RowResize& rr, ThreadRows& t, float* P, int64_t n, int64_t k) {
  for (int s = 0; s < 2; ++s)
    if (t.ukey[s]) {
      transpose_low_row(rr, t.u[s], rr.partial(P, n, t.ukey[s] - 1 - n * rr.h, k));
      t.ukey[s] = 0;
    }
}

// The low-resolution gradient gx (N, C, h, w), in its dtype and strides: per low row, its partial slots added in
// chunk order (0 for a row no full row reads).
template <class Tag>
void gather_low_rows(const RowResize& rr, const float* P, const Tensor4& gx, int num_threads) {
  const int64_t C = rr.C, w = rr.w;
  // (a copy and conversion per element, a fraction of a kernel's work per element: threads only for large ones)
  const int nt = threads_for(num_threads, rr.N * C * rr.h * w / 8);
  for_blocks(rr.N * rr.h, nt, C * w, [&](int64_t row, float* buf) {
    const int64_t n = row / rr.h, i = row % rr.h, ns = rr.off[i + 1] - rr.off[i];
    if (ns == 0) {
      std::fill(buf, buf + C * w, 0.f);
    } else {
      const float* p = P + (n * rr.slots + rr.off[i]) * C * w;
      std::copy(p, p + C * w, buf);
      for (int64_t k = 1; k < ns; ++k)
        for (int64_t e = 0; e < C * w; ++e) buf[e] += p[k * C * w + e];
    }
    store_block<Tag>(gx, offset(gx, n, i, 0), C, w, w, buf);
  });
}

// A resized row's gradient vectors, added times the row's two weights into the accumulators of its low rows.
struct AdjointRows {
  float* u0;
  float* u1;
  int64_t sc;
  float l0, l1;
};
inline void put_vec(const AdjointRows& r, int64_t c, int64_t, int64_t b, vf x) {
  float* p0 = r.u0 + c * r.sc + b;
  vstore(p0, vfma(x, vsplat(r.l0), vload(p0)));
  float* p1 = r.u1 + c * r.sc + b;  // (the same row as p0 at the last low row: read after that store)
  vstore(p1, vfma(x, vsplat(r.l1), vload(p1)));
}

// buf ([C][BS]) = pixels w0 .. w0 + padded - 1 of a resized row: the blend of its two low rows.
inline void blend_rows(const RowCtx& rc, int64_t C, int64_t w0, int64_t padded, int64_t BS, float* buf) {
  const vf l0 = vsplat(rc.l0), l1 = vsplat(rc.l1);
  for (int64_t c = 0; c < C; ++c) {
    const float* p0 = rc.xw0 + c * rc.xs + w0;
    const float* p1 = rc.xw1 + c * rc.xs + w0;
    float* bc = buf + c * BS;
    for (int64_t b = 0; b < padded; b += kV) vstore(bc + b, vfma(vload(p1 + b), l1, vload(p0 + b) * l0));
  }
}

// A (N, h, w) float32 D map resized to (H, W) (none: not resized): its axes and their plans.
struct MapResize {
  const ResizeAxis* ah = nullptr;
  const AxisPlan* pw = nullptr;
  int64_t tag = 0;  // added to the keys of its cached rows (several maps share a thread's MapRows)
};

// A thread's two rows of a D map resized along W ([W] floats + padding each; keys tag + n * h + i + 1, 0: none),
// kept from block to block: a low row is resized along W once for the full rows that read it. `low`: a low row
// copied (the resize reads whole vectors, past the row's end).
struct MapRows {
  int64_t* key;
  float* row[2];
  float* low;
  static int64_t padded(int64_t n) { return (n + 15) / 16 * 16 + 16; }
  static int64_t floats(int64_t W, int64_t w) { return 4 + 2 * padded(W) + padded(w); }
  MapRows(float* s, int64_t W) {  // (s at an even float offset)
    key = reinterpret_cast<int64_t*>(s);
    row[0] = s + 4;
    row[1] = row[0] + padded(W);
    low = row[1] + padded(W);
  }
};

// out[b] = D map m resized to (H, W) at the flat pixel j0 + b of (N, H, W), b < len: the blend of two rows
// resized along W (MapRows). The same code for every pass: the maps-only count and the main pass see bit-identical
// values and keep the same pixels.
__attribute__((noinline)) void resize_map(const Map3& m, const MapResize& mr, int64_t H, int64_t W, int64_t j0,
                                          int64_t len, float* out, MapRows& cache) {
  const float* p = static_cast<const float*>(m.ptr);
  const ResizeAxis& ah = *mr.ah;
  const int64_t h = ah.in, w = mr.pw->a->in;
  int64_t n = j0 / (H * W), r = (j0 / W) % H, q = j0 % W;
  for (int64_t b = 0; b < len;) {
    const int64_t seg = std::min(len - b, W - q);
    const int64_t key0 = mr.tag + n * h + ah.i0[r] + 1, key1 = mr.tag + n * h + ah.i1[r] + 1;
    for (const int64_t key : {key0, key1}) {
      bool fresh;
      const int s = slot_of(cache.key, key, key == key0 ? key1 : key0, fresh);
      if (!fresh) continue;
      const float* src = p + n * m.s0 + (key - 1 - mr.tag - n * h) * m.s1;
      for (int64_t j = 0; j < w; ++j) cache.low[j] = src[j * m.s2];
      mr.pw->resize(cache.low, cache.row[s]);
    }
    const float* z0 = cache.row[cache.key[0] == key0 ? 0 : 1] + q;
    const float* z1 = cache.row[cache.key[0] == key1 ? 0 : 1] + q;
    const float l0 = ah.l0[r], l1 = ah.l1[r];
    for (int64_t k = 0; k < seg; ++k) out[b + k] = sfma(z1[k], l1, z0[k] * l0);
    b += seg;
    q = 0;
    if (++r == H) {
      r = 0;
      ++n;
    }
  }
}

// grad (contiguous (N, h, wl) float32) from t (float (N, H, wl): each full row's gradient transposed along W): per
// low row i, the full rows that read it in order, times their weights for it, in double. The H half of the adjoint
// of a map's resize.
inline void gather_map_grad(const ResizeAxis& ah, int64_t N, int64_t wl, const float* t, float* grad) {
  const int64_t H = ah.out, h = ah.in;
  std::vector<double> acc(static_cast<size_t>(wl));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < h; ++i) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t r = ah.first[i]; r <= ah.last[i]; ++r) {
        const float* tr = t + (n * H + r) * wl;
        if (ah.i0[r] == i) {
          const double l0 = ah.l0[r];
          for (int64_t j = 0; j < wl; ++j) acc[j] += tr[j] * l0;
        }
        if (ah.i1[r] == i) {
          const double l1 = ah.l1[r];
          for (int64_t j = 0; j < wl; ++j) acc[j] += tr[j] * l1;
        }
      }
      float* out = grad + (n * h + i) * wl;
      for (int64_t j = 0; j < wl; ++j) out[j] = static_cast<float>(acc[j]);
    }
}

// Label smoothing's per-call constants (kernels.h): a1 = 1 - eps, a2 = eps / C, the class weights w_c (1s without
// weights) and their sum W, and the gradient's per-channel term, negated: ngw_c = -grad_scale a2 w_c. The
// per-channel values come as whole pixel vectors ([C][kV]): one plain load each in the channel loops.
struct Smoothing {
  float a1 = 1.f, a2 = 0.f, wtot = 0.f;
  const float* w = nullptr;    // [C][kV]
  const float* ngw = nullptr;  // [C][kV]
};

// kSmooth: the label-smoothing terms (a template parameter, so that eps == 0 runs the plain kernel unchanged).
// kPseudo: pseudo-labels from a separate teacher or under a confidence test (a template parameter too: the other
// losses run the loop without those branches; measured about 10% slower on the labelled generator loss with them).
// rc: the row of resized logits (and their gradient's accumulators), tc: the row of a resized teacher (nullptr:
// not resized).
template <class Tag, bool kSmooth, bool kPseudo>
void fused_block(const FusedArgs& a, const Geometry& g, int64_t blk, float* scratch, double* sums, bool stream,
                 RunPos pos, const Smoothing& sm, float keep_at, const MapResize& zr, MapRows* zrows,
                 const RowCtx* rc, const RowCtx* tc) {
  const int64_t C = a.C, BS = g.BS;
  int64_t n, h0, w0, len;
  g.block(blk, n, h0, w0, len);
  float* buf = scratch;          // [C][BS] logits converted to float32, then their gradient (when not in place)
  float* xt = buf + (a.maps_only ? 0 : C) * BS;  // the pixel's loss
  float* wt = xt + BS;           // pixel weight (class weight, 1, or 0)
  int32_t* lab = reinterpret_cast<int32_t*>(wt + BS);     // label (or -1)
  int32_t* cnt = lab + BS;                                // counted? (0 / 1)
  int32_t* ign = cnt + BS;                                // ignore mask (keep_mode)
  float* zb = reinterpret_cast<float*>(ign + BS);         // discriminator logit
  float* sg = zb + BS;                                    // sigmoid(z) (for the gradient of the adv term)
  float* ad = sg + BS;                                    // BCE(z, 1)
  int64_t* lab64 = reinterpret_cast<int64_t*>(ad + BS);   // labels as read (2 * BS floats)
  float* ev = reinterpret_cast<float*>(lab64 + BS);       // [C][kV] exp(x - max) of one pixel vector
  float* sbuf = ev + C * kV;                              // stream_scratch(C), for block_stream
  float* tbuf = sbuf + stream_scratch(C);                 // [C][BS] a separate teacher's logits (not in place)

  double loss = 0, wsum = 0, adv = 0, adv_count = 0, kept = 0, considered = 0;
  int64_t bad = 0, first_bad = -1;

  // 1. Per-pixel maps: labels, keep mask, adversarial term. Strided reads first, then the math in contiguous
  //    loops (vectorised), then the counts. Output maps are contiguous: this block's pixels are pix0 + b.
  const int64_t pix0 = (n * a.H + h0) * a.W + w0;
  if (!a.maps_only) {
    prefetch_map<int64_t>(a.labels, a.H, a.W, pix0 + kAhead * g.B, len);
    if (!zr.ah) prefetch_map<float>(a.z, a.H, a.W, pix0 + kAhead * g.B, len);
  }
  if (a.label_mode == 0) {
    gather_map<int64_t>(a.labels, a.H, a.W, pix0, len, lab64);
    const int64_t ignore_index = a.ignore_index;
    for (int64_t b = 0; b < len; ++b) {  // out-of-range labels are never used as an index
      const int64_t v = lab64[b];
      const bool valid = v != ignore_index && v >= 0 && v < C;
      lab[b] = valid ? static_cast<int32_t>(v) : -1;
      bad += !valid & (v != ignore_index);
    }
    if (bad)
      for (int64_t b = 0; b < len && first_bad < 0; ++b)
        if (lab[b] < 0 && lab64[b] != ignore_index) first_bad = pix0 + b;
    if (a.weight) {
      for (int64_t b = 0; b < len; ++b) wt[b] = lab[b] >= 0 ? a.weight[lab[b]] : 0.f;
    } else {
      for (int64_t b = 0; b < len; ++b) wt[b] = lab[b] >= 0 ? 1.f : 0.f;
    }
  } else {
    for (int64_t b = 0; b < len; ++b) {
      lab[b] = -1;
      wt[b] = 0.f;
    }
  }
  for (int64_t b = 0; b < len; ++b) cnt[b] = lab[b] >= 0;
  const bool adv_terms = a.adv_mode != 0 && !a.maps_only;
  if (a.z.ptr && (a.keep_mode || adv_terms)) {
    if (zr.ah) {
      resize_map(a.z, zr, a.H, a.W, pix0, len, zb, *zrows);
    } else {
      gather_map<float>(a.z, a.H, a.W, pix0, len, zb);
    }
  }
  if (a.keep_mode) {
    if (a.mask.ptr) {
      gather_map<uint8_t>(a.mask, a.H, a.W, pix0, len, ign);
    } else {
      for (int64_t b = 0; b < len; ++b) ign[b] = 0;
    }
  }
  if (adv_terms) {  // (the keep rule reads z itself)
    const int64_t padded = (len + kV - 1) / kV * kV;  // (the per-pixel arrays hold BS >= padded entries)
    for (int64_t b = len; b < padded; ++b) zb[b] = 0.f;
    for (int64_t b = 0; b < padded; b += kV) {
      const vf z = vload(zb + b);
      const vf e = vexp_neg_abs(z);
      const DiscTerms d = vdisc_terms(z, e, vsplat(1.0f));
      vstore(sg + b, d.sigmoid);
      vstore(ad + b, d.bce);
    }
  }
  if (a.keep_mode) {
    // keep_at = keep_logit(a.threshold) (a local, not a field of `a`: the float stores below cannot alias it)
    if (a.z.ptr) {
      for (int64_t b = 0; b < len; ++b) {
        const int32_t k = !ign[b] && zb[b] > keep_at;  // sigmoid(z) > T exactly; NaN z never kept
        cnt[b] = k;
        wt[b] = k ? 1.f : 0.f;
      }
    } else {  // (no discriminator test: the pseudo-label loss without d_logits)
      for (int64_t b = 0; b < len; ++b) {
        cnt[b] = !ign[b];
        wt[b] = ign[b] ? 0.f : 1.f;
      }
    }
    considered = static_cast<double>(len - count_nonzero(ign, len));
    kept = static_cast<double>(count_nonzero(cnt, len));
  }
  // labelled batches (adv_mode 1): the adversarial term counts the pixels with a valid label
  if (a.adv_mode != 0) adv_count = static_cast<double>(a.adv_mode == 2 ? len : count_nonzero(cnt, len));
  if (adv_terms) {
    if (a.adv_mode == 1)
      for (int64_t b = 0; b < len; ++b) ad[b] = lab[b] >= 0 ? ad[b] : 0.0f;  // a select: NaN stays out
    adv = sum_fixed(ad, len);
    if (a.grad_z) {
      float* gz = zr.ah ? rc->gz + w0 : a.grad_z + pix0;  // (a resized map's: its row's, transposed at its end)
      const float scale = a.grad_z_scale;
      const bool all = a.adv_mode == 2;
      for (int64_t b = 0; b < len; ++b) gz[b] = (all || lab[b] >= 0) ? (sg[b] - 1.0f) * scale : 0.0f;
    }
  }
  if (a.weight) {
    for (int64_t b = 0; b < len; ++b) sg[b] = cnt[b] ? wt[b] : 0.f;
    wsum = sum_fixed(sg, len);  // (sg is free: class weights come without a discriminator map)
  } else {
    wsum = static_cast<double>(count_nonzero(cnt, len));
  }

  if (!a.maps_only) {
    // 2. Lanes past `len` (the last block of a row) are padding: finite values, never counted or stored.
    const int64_t nvec = (len + kV - 1) / kV;
    for (int64_t b = len; b < nvec * kV; ++b) {
      lab[b] = -1;
      cnt[b] = 0;
      wt[b] = 0.f;
    }
    // Logits and gradient with unit pixel stride are read and written in place, in their own dtype (whole pixel
    // vectors); otherwise the logits are converted into `buf` first, and the gradient is written into `buf` (each
    // vector's logits are dead by the time its gradient is written over them) and stored from there.
    // Resized logits (rc->xw0) are blended into `buf` from their row's two low rows, and the gradient goes into
    // the accumulators of those rows (AdjointRows).
    const bool resized = rc && rc->xw0;
    const int64_t xbase = resized ? 0 : offset(a.x, n, h0, w0), gbase = resized ? 0 : offset(a.grad, n, h0, w0);
    const bool want_grad = a.grad.ptr != nullptr;
    const bool direct = !resized && rows_in_place(a.x, len) && (!want_grad || rows_in_place(a.grad, len));
    if (resized) {
      blend_rows(*rc, C, w0, nvec * kV, BS, buf);
    } else if (!direct) {
      load_padded<Tag>(a.x, xbase, C, len, BS, buf);
    }
    const bool streamed = stream && direct && want_grad && std::is_same<Tag, Float32>::value;
    const BlockLines pf_in = resized ? BlockLines{} : block_lines(a.x, xbase, C);
    // (streamed: no reads; resized: no gradient tensor in the block)
    const BlockLines pf_out = streamed || resized ? BlockLines{} : block_lines(a.grad, gbase, C);
    const float grad_scale = a.grad_scale;
    const bool argmax = a.label_mode == 1;
    // A separate teacher (pseudo-labels from other logits): read in place like the logits when its rows allow,
    // else converted (or, resized, blended from its row's two low rows) into tbuf.
    const bool separate = kPseudo && argmax && a.teacher.ptr != nullptr;
    const bool t_resized = separate && tc && tc->xw0;
    const int64_t tbase = separate && !t_resized ? offset(a.teacher, n, h0, w0) : 0;
    const bool t_direct = separate && !t_resized && rows_in_place(a.teacher, len);
    if (t_resized) {
      blend_rows(*tc, C, w0, nvec * kV, BS, tbuf);
    } else if (separate && !t_direct) {
      load_padded<Tag>(a.teacher, tbase, C, len, BS, tbuf);
    }
    const BlockLines pf_t = t_direct ? block_lines(a.teacher, tbase, C) : BlockLines{};
    const bool confidence_test = kPseudo && argmax && a.confidence_test;

    // tin: the teacher's rows (`in` itself when the pseudo-labels come from the logits)
    auto vectors = [&](const auto& in, const auto& tin, const auto& out) {
      // (locals of the loop, not captures: the stores below, through memcpy, would make it reload captures)
      [[maybe_unused]] const float* const smooth_w = sm.w;
      [[maybe_unused]] const float* const smooth_ngw = sm.ngw;
      [[maybe_unused]] const float smooth_a1 = sm.a1, smooth_a2 = sm.a2, smooth_wtot = sm.wtot;
      const vf min_confidence = vsplat(a.confidence);
      for (int64_t v = 0; v < nvec; ++v) {
        const int64_t b = v * kV;
        prefetch_rows<false>(pf_in, b, kAhead * g.B);
        if (separate) prefetch_rows<false>(pf_t, b, kAhead * g.B);
        if (want_grad) prefetch_rows<true>(pf_out, b, kAhead * g.B);
        // 3. Max over channels (NaN-ignoring: x > m ? x : m) and, for pseudo-labels, the first argmax (of the
        //    teacher's logits, or of these).
        vf m = in.load(b);
        vi lv;
        vi counted = vload_i(cnt + b) != 0;
        if (argmax) {
          vi am = vi{};
          if (separate) {
            for (int64_t c = 1; c < C; ++c) {
              const vf xv = in.load(b + c * in.sc);
              m = vselect(xv > m, xv, m);
            }
            vf tm = tin.load(b);
            for (int64_t c = 1; c < C; ++c) {
              const vf tv = tin.load(b + c * tin.sc);
              const vi gt = tv > tm;
              tm = vselect(gt, tv, tm);
              am = vselect_i(gt, vsplat_i(static_cast<int32_t>(c)), am);
            }
            // the teacher's confidence 1 / sum_c exp(t_c - max): a NaN logit makes it NaN, never kept
            if (confidence_test) {
              vf ts = vf{};
              for (int64_t c = 0; c < C; ++c) ts += vexp_nonpositive(tin.load(b + c * tin.sc) - tm);
              counted = counted & (vsplat(1.0f) / ts >= min_confidence);
            }
          } else {
            for (int64_t c = 1; c < C; ++c) {
              const vf xv = in.load(b + c * in.sc);
              const vi gt = xv > m;
              m = vselect(gt, xv, m);
              am = vselect_i(gt, vsplat_i(static_cast<int32_t>(c)), am);
            }
          }
          lv = vselect_i(counted, am, vsplat_i(-1));
          vstore_i(lab + b, lv);
        } else {
          for (int64_t c = 1; c < C; ++c) {
            const vf xv = in.load(b + c * in.sc);
            m = vselect(xv > m, xv, m);
          }
          lv = vload_i(lab + b);
        }
        // 4. exp(x - max) (kept for the gradient), its sum and the label's logit; with label smoothing also
        //    sx = sum_c w_c (x_c - max), one more FMA per logit already in a register.
        vf s = vf{}, xt_v = vf{}, sx = vf{};
        for (int64_t c = 0; c < C; ++c) {
          const vf xv = in.load(b + c * in.sc);
          xt_v = vselect(lv == vsplat_i(static_cast<int32_t>(c)), xv, xt_v);
          const vf d = xv - m;
          const vf e = vexp_nonpositive(d);
          s += e;
          if constexpr (kSmooth) sx = vfma(vload(smooth_w + c * kV), d, sx);
          vstore(ev + c * kV, e);
        }
        // the confidence of the logits' own pseudo-labels, from the sum just formed (no second walk)
        if (confidence_test && !separate) counted = counted & (vsplat(1.0f) / s >= min_confidence);
        if (confidence_test) vstore_i(cnt + b, counted);  // (the kept count, after the loop)
        // 5. Loss per pixel: nll = log(sum) - (x[y] - max), PyTorch's log_softmax rounding. Not-counted pixels
        //    contribute an exact 0 (a select, so that a NaN there cannot leak in). With label smoothing:
        //    a1 w nll + a2 sum_c w_c (lse - x_c), the latter = a2 (W log(sum) - sx).
        const vf w = vload(wt + b);
        const vf ls = vlog_positive(s);
        const vf nll = ls - (xt_v - m);
        if constexpr (kSmooth) {
          const vf smooth = vfma(vsplat(smooth_wtot), ls, -sx);
          vstore(xt + b, vselect(counted, vfma(nll, w * vsplat(smooth_a1), smooth * vsplat(smooth_a2)), vf{}));
        } else {
          vstore(xt + b, vselect(counted, nll * w, vf{}));
        }
        // 6. Gradient of grad_scale * sum(w * nll): coef * softmax - coef * onehot, exactly 0 where not counted
        //    (a select: NaN/Inf logits at an ignored pixel stay out of the gradient too). With label smoothing:
        //    grad_scale (a1 w + a2 W) softmax + ngw_c - grad_scale a1 w onehot (ngw_c in the FMA: no extra op).
        if (want_grad) {
          if constexpr (kSmooth) {
            const vf coef_v = w * vsplat(grad_scale * smooth_a1);
            const vf k = vfma(w, vsplat(grad_scale * smooth_a1), vsplat(grad_scale * smooth_a2 * smooth_wtot)) / s;
            for (int64_t c = 0; c < C; ++c) {
              const vi is_label = lv == vsplat_i(static_cast<int32_t>(c));
              const vf gr = vfma(vload(ev + c * kV), k, vload(smooth_ngw + c * kV)) - vselect(is_label, coef_v, vf{});
              put_vec(out, c, v, b, vselect(counted, gr, vf{}));
            }
          } else {
            const vf coef_v = w * vsplat(grad_scale);
            const vf k = coef_v / s;
            for (int64_t c = 0; c < C; ++c) {
              const vi is_label = lv == vsplat_i(static_cast<int32_t>(c));
              const vf gr = vload(ev + c * kV) * k - vselect(is_label, coef_v, vf{});
              put_vec(out, c, v, b, vselect(counted, gr, vf{}));
            }
          }
        }
      }
    };
    // (only the pseudo-label instances read a separate teacher)
    auto with_teacher = [&](const auto& in, const auto& out) {
      if constexpr (kPseudo) {
        if (t_direct) return vectors(in, tensor_rows<Tag>(a.teacher, tbase), out);
        if (separate) return vectors(in, Rows<Float32>{tbuf, BS}, out);
      }
      vectors(in, in, out);
    };
    if (resized && want_grad) {
      with_teacher(Rows<Float32>{buf, BS}, AdjointRows{rc->u0 + w0, rc->u1 + w0, rc->xs, rc->l0, rc->l1});
    } else if (streamed) {
      const StreamRows out = block_stream(a.grad, gbase, C, g, blk, len, pos, sbuf);
      with_teacher(tensor_rows<Tag>(a.x, xbase), out);
      out.finish(C, nvec);
    } else if (direct) {
      with_teacher(tensor_rows<Tag>(a.x, xbase), tensor_rows<Tag>(a.grad, gbase));
    } else {
      with_teacher(Rows<Float32>{buf, BS}, Rows<Float32>{buf, BS});
    }
    if (confidence_test) {
      kept = static_cast<double>(count_nonzero(cnt, len));
      wsum = kept;
    }
    loss = sum_fixed(xt, len);
    if (a.loss_map) std::copy(xt, xt + len, a.loss_map + pix0);
    if (want_grad && !direct && !resized) store_block<Tag>(a.grad, gbase, C, len, BS, buf);
  }

  sums[kLossSum] = loss;
  sums[kWeightSum] = wsum;
  sums[kAdvSum] = adv;
  sums[kAdvCount] = adv_count;
  sums[kKept] = kept;
  sums[kConsidered] = considered;
  sums[kBadLabels] = static_cast<double>(bad);
  sums[kFirstBad] = static_cast<double>(first_bad);  // (exact: pixel indices stay far below 2^53)
}

// y = softmax over channels of one block: per pixel vector, the max, then exp(x - max) and its sum, then y.
template <class Tag>
void softmax_forward_block(int64_t C, const Geometry& g, const Tensor4& x, const Tensor4& y, int64_t blk,
                           float* scratch, bool stream, RunPos pos, const RowCtx* rc = nullptr) {
  const int64_t BS = g.BS;
  int64_t n, h0, w0, len;
  g.block(blk, n, h0, w0, len);
  float* buf = scratch;        // [C][BS] x converted (when not read in place), then y (when not written in place)
  float* ev = buf + C * BS;    // [C][kV] exp(x - max) of one pixel vector
  float* sbuf = ev + C * kV;   // stream_scratch(C), for block_stream
  // resized logits (rc): blended into buf from the row's two low rows
  const int64_t xbase = rc ? 0 : offset(x, n, h0, w0), ybase = offset(y, n, h0, w0);
  const bool direct = !rc && rows_in_place(x, len) && rows_in_place(y, len);
  const bool streamed = stream && rows_in_place(y, len) && (direct || rc) && std::is_same<Tag, Float32>::value;
  if (rc) {
    blend_rows(*rc, C, w0, (len + kV - 1) / kV * kV, BS, buf);
  } else if (!direct) {
    load_padded<Tag>(x, xbase, C, len, BS, buf);
  }
  const BlockLines pf_in = rc ? BlockLines{} : block_lines(x, xbase, C);
  const BlockLines pf_out = streamed ? BlockLines{} : block_lines(y, ybase, C);
  auto vectors = [&](const auto& in, const auto& out) {
    for (int64_t b = 0; b < len; b += kV) {
      prefetch_rows<false>(pf_in, b, kAhead * g.B);
      prefetch_rows<true>(pf_out, b, kAhead * g.B);
      vf m = in.load(b);
      for (int64_t c = 1; c < C; ++c) {
        const vf xv = in.load(b + c * in.sc);
        m = vselect(xv > m, xv, m);
      }
      vf s = vf{};
      for (int64_t c = 0; c < C; ++c) {
        const vf e = vexp_nonpositive(in.load(b + c * in.sc) - m);
        s += e;
        vstore(ev + c * kV, e);
      }
      const vf r = vsplat(1.0f) / s;
      for (int64_t c = 0; c < C; ++c) put_vec(out, c, b / kV, b, vload(ev + c * kV) * r);
    }
  };
  if (rc && streamed) {
    const StreamRows out = block_stream(y, ybase, C, g, blk, len, pos, sbuf);
    vectors(Rows<Float32>{buf, BS}, out);
    out.finish(C, len / kV);
  } else if (rc && rows_in_place(y, len)) {
    vectors(Rows<Float32>{buf, BS}, tensor_rows<Tag>(y, ybase));
  } else if (streamed) {
    const StreamRows out = block_stream(y, ybase, C, g, blk, len, pos, sbuf);
    vectors(tensor_rows<Tag>(x, xbase), out);
    out.finish(C, len / kV);
  } else if (direct) {
    vectors(tensor_rows<Tag>(x, xbase), tensor_rows<Tag>(y, ybase));
  } else {
    vectors(Rows<Float32>{buf, BS}, Rows<Float32>{buf, BS});
    store_block<Tag>(y, ybase, C, len, BS, buf);
  }
}

// grad_x = y * (grad_y - sum_c y * grad_y) of one block, per pixel vector.
template <class Tag>
void softmax_backward_block(int64_t C, const Geometry& g, const Tensor4& y, const Tensor4& gy, const Tensor4& gx,
                            int64_t blk, float* scratch, bool stream, RunPos pos, const RowCtx* rc = nullptr) {
  const int64_t BS = g.BS;
  int64_t n, h0, w0, len;
  g.block(blk, n, h0, w0, len);
  float* by = scratch;         // [C][BS] y converted (when not read in place)
  float* bg = by + C * BS;     // [C][BS] grad_y converted, then grad_x (each element read before it is written)
  float* sbuf = bg + C * BS;   // stream_scratch(C), for block_stream
  // a resized gradient (rc): gx is low-resolution, the row's gradient goes into its low rows' accumulators
  const int64_t ybase = offset(y, n, h0, w0), gybase = offset(gy, n, h0, w0);
  const int64_t gxbase = rc ? 0 : offset(gx, n, h0, w0);
  const bool direct = rows_in_place(y, len) && rows_in_place(gy, len) && (rc || rows_in_place(gx, len));
  const bool streamed = !rc && stream && direct && std::is_same<Tag, Float32>::value;
  if (!direct) {
    load_padded<Tag>(y, ybase, C, len, BS, by);
    load_padded<Tag>(gy, gybase, C, len, BS, bg);
  }
  const BlockLines pf_y = block_lines(y, ybase, C), pf_gy = block_lines(gy, gybase, C);
  const BlockLines pf_gx = streamed || rc ? BlockLines{} : block_lines(gx, gxbase, C);
  auto vectors = [&](const auto& iy, const auto& ig, const auto& out) {
    for (int64_t b = 0; b < len; b += kV) {
      prefetch_rows<false>(pf_y, b, kAhead * g.B);
      prefetch_rows<false>(pf_gy, b, kAhead * g.B);
      prefetch_rows<true>(pf_gx, b, kAhead * g.B);
      vf dot = vf{};
      for (int64_t c = 0; c < C; ++c) dot += iy.load(b + c * iy.sc) * ig.load(b + c * ig.sc);
      for (int64_t c = 0; c < C; ++c)
        put_vec(out, c, b / kV, b, iy.load(b + c * iy.sc) * (ig.load(b + c * ig.sc) - dot));
    }
  };
  if (rc) {
    const AdjointRows out{rc->u0 + w0, rc->u1 + w0, rc->xs, rc->l0, rc->l1};
    if (direct) {
      vectors(tensor_rows<Tag>(y, ybase), tensor_rows<Tag>(gy, gybase), out);
    } else {
      vectors(Rows<Float32>{by, BS}, Rows<Float32>{bg, BS}, out);
    }
  } else if (streamed) {
    const StreamRows out = block_stream(gx, gxbase, C, g, blk, len, pos, sbuf);
    vectors(tensor_rows<Tag>(y, ybase), tensor_rows<Tag>(gy, gybase), out);
    out.finish(C, len / kV);
  } else if (direct) {
    vectors(tensor_rows<Tag>(y, ybase), tensor_rows<Tag>(gy, gybase), tensor_rows<Tag>(gx, gxbase));
  } else {
    vectors(Rows<Float32>{by, BS}, Rows<Float32>{bg, BS}, Rows<Float32>{bg, BS});
    store_block<Tag>(gx, gxbase, C, len, BS, bg);
  }
}

template <class E>
void one_hot_impl(int64_t N, int64_t C, int64_t H, int64_t W, const Map3& labels, int64_t ignore_index, E* out,
                  E one, int num_threads) {
  const int64_t HW = H * W;
  const int64_t B = 1024;
  const int64_t per_row = (HW + B - 1) / B;
  const int nt = threads_for(num_threads, N * C * HW);
  for_blocks(N * per_row, nt, 3 * B, [&](int64_t blk, float* scratch) {
    const int64_t n = blk / per_row, j0 = (blk % per_row) * B, len = std::min(B, HW - j0);
    int32_t* lab = reinterpret_cast<int32_t*>(scratch);
    int64_t* lab64 = reinterpret_cast<int64_t*>(scratch + B);
    gather_map<int64_t>(labels, H, W, n * HW + j0, len, lab64);
    for (int64_t b = 0; b < len; ++b) {
      const int64_t v = lab64[b];
      lab[b] = (v != ignore_index && v >= 0 && v < C) ? static_cast<int32_t>(v) : -1;
    }
    const E on = one, off = E(0);  // locals: stores of E cannot alias them
    for (int64_t c = 0; c < C; ++c) {
      E* oc = out + (n * C + c) * HW + j0;
      const int32_t ci = static_cast<int32_t>(c);
      for (int64_t b = 0; b < len; ++b) oc[b] = lab[b] == ci ? on : off;
    }
  });
}

}  // namespace

std::vector<double> fused_loss(const FusedArgs& a) {
  const int64_t xH = a.xH ? a.xH : a.H, xW = a.xW ? a.xW : a.W;
  const int64_t zH = a.zH ? a.zH : a.H, zW = a.zW ? a.zW : a.W;
  const bool resize_x = !a.maps_only && (xH != a.H || xW != a.W) && a.N * a.H * a.W > 0;
  const bool resize_z = a.z.ptr && (zH != a.H || zW != a.W) && a.N * a.H * a.W > 0;
  const int64_t tH = a.tH ? a.tH : a.H, tW = a.tW ? a.tW : a.W;
  const bool separate = !a.maps_only && a.label_mode == 1 && a.teacher.ptr;
  const bool resize_t = separate && (tH != a.H || tW != a.W) && a.N * a.H * a.W > 0;
  ResizeAxis zah, zaw;
  AxisPlan zpw;
  MapResize zr;
  if (resize_z) {
    zah = resize_axis(zH, a.H, a.align_corners);
    zaw = resize_axis(zW, a.W, a.align_corners);
    zpw = AxisPlan(zaw);
    zr = {&zah, &zpw, 0};
  }
  // Resized logits (the teacher's too) are blended row by row, and a resized gradient (of the logits or of z) is
  // transposed row by row: whole rows on one thread.
  const bool by_rows = !a.maps_only && (resize_x || resize_t || (resize_z && a.grad_z));
  // The maps-only pre-pass reads no logits: long blocks (fewer per-block overheads), no [C][B] scratch.
  const Geometry g = a.maps_only ? Geometry(a.N, 1, a.H, a.W, {}, kMapsBlock)
                     : by_rows   ? Geometry(a.N, a.C, a.H, a.W, {}, kMaxBlock, true)
                                 : Geometry(a.N, a.C, a.H, a.W, {&a.x, &a.grad, &a.teacher});
  const int64_t block_scratch = a.maps_only ? kFusedMaps * g.BS
                                            : (a.C + kFusedMaps) * g.BS + a.C * kV + stream_scratch(a.C) +
                                                  (separate ? a.C * g.BS : 0);  // (fused_block's tbuf)
  // then (even offsets: they hold int64 keys) the D map's cached rows, and the row driver's rows
  const int64_t zrows_at = (block_scratch + 1) / 2 * 2;
  const int64_t scratch = zrows_at + (resize_z ? MapRows::floats(a.W, zW) : 0);
  const int64_t elements = a.N * a.C * a.H * a.W;
  const int nt = threads_for(a.num_threads, a.maps_only ? a.N * a.H * a.W : elements);
  const bool stream = !resize_x && streams(a.grad, elements);
  std::vector<double> partial(static_cast<size_t>(kNumSums * g.nblocks), 0.0);
  const float keep_at = keep_logit(a.threshold);  // the keep rule's constant, once per call (keep_mode)
  // Label smoothing (label_mode 0 with logits): one branch per call; its constants for every block.
  const bool smooth = a.label_smoothing != 0.f && a.label_mode == 0 && !a.maps_only;
  const bool pseudo = !a.maps_only && a.label_mode == 1 && (a.teacher.ptr || a.confidence_test);
  // The loop's compile-time variant, for both drivers below: label smoothing (it comes with labels, never with
  // pseudo-labels), pseudo-labels from a teacher or under a confidence test, or neither.
  auto run_variant = [&](auto&& run) {
    if (smooth) {
      run(std::true_type{}, std::false_type{});
    } else if (pseudo) {
      run(std::false_type{}, std::true_type{});
    } else {
      run(std::false_type{}, std::false_type{});
    }
  };
  Smoothing sm;
  std::vector<float> smooth_w, smooth_ngw;
  if (smooth) {
    const int64_t C = a.C;
    const float eps = a.label_smoothing;
    sm.a1 = 1.f - eps;
    sm.a2 = static_cast<float>(static_cast<double>(eps) / static_cast<double>(C));
    smooth_w.resize(static_cast<size_t>(C * kV));
    smooth_ngw.resize(static_cast<size_t>(C * kV));
    double wtot = 0;
    for (int64_t c = 0; c < C; ++c) {
      const float wc = a.weight ? a.weight[c] : 1.f;
      const float ngw = static_cast<float>(-static_cast<double>(a.grad_scale) * sm.a2 * wc);
      wtot += wc;
      std::fill_n(smooth_w.begin() + c * kV, kV, wc);
      std::fill_n(smooth_ngw.begin() + c * kV, kV, ngw);
    }
    sm.wtot = static_cast<float>(wtot);
    sm.w = smooth_w.data();
    sm.ngw = smooth_ngw.data();
  }

  if (!by_rows) {
    auto run = [&](auto smooth_tag, auto pseudo_tag) {
      constexpr bool kSmooth = decltype(smooth_tag)::value, kPseudo = decltype(pseudo_tag)::value;
      FAS_DISPATCH_DTYPE(a.x.dtype, for_blocks(g.nblocks, nt, scratch, [&](int64_t blk, float* s, RunPos pos) {
        double sums[kNumSums];
        MapRows zrows(s + zrows_at, a.W);
        fused_block<Tag, kSmooth, kPseudo>(a, g, blk, s, sums, stream, pos, sm, keep_at, zr, &zrows, nullptr, nullptr);
        for (int k = 0; k < kNumSums; ++k) partial[k * g.nblocks + blk] = sums[k];
      }));
    };
    run_variant(run);
  } else {
    // Chunks of whole rows, each on one thread, its rows and their blocks in order (see RowResize).
    ResizeAxis xah, xaw;
    if (resize_x) {
      xah = resize_axis(xH, a.H, a.align_corners);
      xaw = resize_axis(xW, a.W, a.align_corners);
    } else {  // (only z is resized: the plan's chunks, no X rows)
      xah = resize_axis(a.H, a.H, false);
      xaw = resize_axis(1, 1, false);
    }
    const RowResize rr(xah, xaw, a.N, resize_x ? a.C : 0);
    // a resized teacher: its own rows, blended like the logits' (forward only)
    ResizeAxis tah, taw;
    std::optional<RowResize> tr;
    if (resize_t) {
      tah = resize_axis(tH, a.H, a.align_corners);
      taw = resize_axis(tW, a.W, a.align_corners);
      tr.emplace(tah, taw, a.N, a.C);
    }
    const bool want_grad = resize_x && a.grad.ptr;
    const bool grad_z = resize_z && a.grad_z;
    // (every partial slot and transposed row is written before it is read: no zeroing)
    const std::unique_ptr<float[]> P(new float[want_grad ? a.N * rr.slots * a.C * xW : 0]);
    const std::unique_ptr<float[]> tz(new float[grad_z ? a.N * a.H * zW : 0]);  // rows transposed along W
    const int64_t rows_at = scratch;  // (even)
    const int64_t gz_at = rows_at + (resize_x ? rr.scratch(want_grad) : 0);
    const int64_t t_rows_at = gz_at + (grad_z ? MapRows::padded(a.W) : 0);  // (even)
    const int64_t total = t_rows_at + (resize_t ? tr->scratch(false) : 0);
    auto run = [&](auto smooth_tag, auto pseudo_tag) {
      constexpr bool kSmooth = decltype(smooth_tag)::value, kPseudo = decltype(pseudo_tag)::value;
      FAS_DISPATCH_DTYPE(a.x.dtype, for_blocks(a.N * rr.chunks, nt, total, [&](int64_t chunk, float* s) {
        const int64_t n = chunk / rr.chunks, k = chunk % rr.chunks;
        const int64_t r0 = k * rr.chunk_rows, r1 = std::min(a.H, r0 + rr.chunk_rows);
        ThreadRows t(s + rows_at, rr, want_grad);
        std::optional<ThreadRows> tt;
        if (resize_t) tt.emplace(s + t_rows_at, *tr, false);
        MapRows zrows(s + zrows_at, a.W);
        for (int64_t r = r0; r < r1; ++r) {
          RowCtx rc, tc;
          if (resize_x) enter_x_row<Tag>(a.x, rr, t, n, r, rc);
          if (resize_t) enter_x_row<Tag>(a.teacher, *tr, *tt, n, r, tc);
          if (want_grad) enter_grad_row(rr, t, P.get(), n, k, r, rc);
          if (grad_z) rc.gz = s + gz_at;
          for (int64_t kb = 0; kb < g.per_row; ++kb) {
            const int64_t blk = (n * a.H + r) * g.per_row + kb;
            double sums[kNumSums];
            fused_block<Tag, kSmooth, kPseudo>(a, g, blk, s, sums, stream, RunPos{kb == 0, kb + 1 == g.per_row}, sm,
                                      keep_at, zr, &zrows, &rc, resize_t ? &tc : nullptr);
            for (int q = 0; q < kNumSums; ++q) partial[q * g.nblocks + blk] = sums[q];
          }
          if (grad_z) zpw.transpose(rc.gz, tz.get() + (n * a.H + r) * zW);
        }
        if (want_grad) leave_chunk(rr, t, P.get(), n, k);
      }));
    };
    run_variant(run);
    if (want_grad) FAS_DISPATCH_DTYPE(a.grad.dtype, gather_low_rows<Tag>(rr, P.get(), a.grad, nt));
    if (grad_z) gather_map_grad(zah, a.N, zW, tz.get(), a.grad_z);
  }
  std::vector<double> out = sum_blocks(partial, g.nblocks, kNumSums);
  out[kFirstBad] = -1;  // the first block that has one, not a sum
  for (int64_t blk = 0; blk < g.nblocks && out[kFirstBad] < 0; ++blk)
    out[kFirstBad] = partial[kFirstBad * g.nblocks + blk];
  return out;
}

void softmax_forward(int64_t N, int64_t C, int64_t H, int64_t W, const Tensor4& x, const Tensor4& y,
                     int num_threads) {
  const Geometry g(N, C, H, W, {&x, &y});
  const int nt = threads_for(num_threads, N * C * H * W);
  const bool stream = streams(y, N * C * H * W);
  const int64_t scratch = C * g.BS + C * kV + stream_scratch(C);
  FAS_DISPATCH_DTYPE(x.dtype, for_blocks(g.nblocks, nt, scratch, [&](int64_t blk, float* s, RunPos pos) {
    softmax_forward_block<Tag>(C, g, x, y, blk, s, stream, pos);
  }));
}

void softmax_backward(int64_t N, int64_t C, int64_t H, int64_t W, const Tensor4& y, const Tensor4& gy,
                      const Tensor4& gx, int num_threads) {
  if (y.dtype != gy.dtype || y.dtype != gx.dtype) throw std::invalid_argument("softmax_backward: mixed dtypes");
  const Geometry g(N, C, H, W, {&y, &gy, &gx});
  const int nt = threads_for(num_threads, N * C * H * W);
  const bool stream = streams(gx, N * C * H * W);
  const int64_t scratch = 2 * C * g.BS + stream_scratch(C);
  FAS_DISPATCH_DTYPE(y.dtype, for_blocks(g.nblocks, nt, scratch, [&](int64_t blk, float* s, RunPos pos) {
    softmax_backward_block<Tag>(C, g, y, gy, gx, blk, s, stream, pos);
  }));
}

void softmax_forward_resized(int64_t N, int64_t C, int64_t H, int64_t W, int64_t h, int64_t w, bool align_corners,
                             const Tensor4& x, const Tensor4& y, int num_threads) {
  if (N * C * H * W == 0) return;
  const ResizeAxis ah = resize_axis(h, H, align_corners), aw = resize_axis(w, W, align_corners);
  const RowResize rr(ah, aw, N, C);
  const Geometry g(N, C, H, W, {}, kMaxBlock, true);
  const int nt = threads_for(num_threads, N * C * H * W);
  const bool stream = streams(y, N * C * H * W);
  const int64_t rows_at = (C * g.BS + C * kV + stream_scratch(C) + 1) / 2 * 2;
  FAS_DISPATCH_DTYPE(x.dtype, for_blocks(N * rr.chunks, nt, rows_at + rr.scratch(false), [&](int64_t chunk, float* s) {
    const int64_t n = chunk / rr.chunks, k = chunk % rr.chunks;
    const int64_t r0 = k * rr.chunk_rows, r1 = std::min(H, r0 + rr.chunk_rows);
    ThreadRows t(s + rows_at, rr, false);
    for (int64_t r = r0; r < r1; ++r) {
      RowCtx rc;
      enter_x_row<Tag>(x, rr, t, n, r, rc);
      for (int64_t kb = 0; kb < g.per_row; ++kb)
        softmax_forward_block<Tag>(C, g, x, y, (n * H + r) * g.per_row + kb, s, stream,
                                   RunPos{kb == 0, kb + 1 == g.per_row}, &rc);
    }
  }));
}

void softmax_backward_resized(int64_t N, int64_t C, int64_t H, int64_t W, int64_t h, int64_t w, bool align_corners,
                              const Tensor4& y, const Tensor4& gy, const Tensor4& gx, int num_threads) {
  if (y.dtype != gy.dtype || y.dtype != gx.dtype) throw std::invalid_argument("softmax_backward: mixed dtypes");
  if (N * C * h * w == 0) return;
  const ResizeAxis ah = resize_axis(h, H, align_corners), aw = resize_axis(w, W, align_corners);
  const RowResize rr(ah, aw, N, C);
  const Geometry g(N, C, H, W, {}, kMaxBlock, true);
  const int nt = threads_for(num_threads, N * C * H * W);
  const std::unique_ptr<float[]> P(new float[N * rr.slots * C * w]);  // (every slot written before it is read)
  const int64_t rows_at = (2 * C * g.BS + stream_scratch(C) + 1) / 2 * 2;
  FAS_DISPATCH_DTYPE(y.dtype, {
    for_blocks(N * rr.chunks, nt, rows_at + rr.scratch(true), [&](int64_t chunk, float* s) {
      const int64_t n = chunk / rr.chunks, k = chunk % rr.chunks;
      const int64_t r0 = k * rr.chunk_rows, r1 = std::min(H, r0 + rr.chunk_rows);
      ThreadRows t(s + rows_at, rr, true);
      for (int64_t r = r0; r < r1; ++r) {
        RowCtx rc;
        enter_grad_row(rr, t, P.get(), n, k, r, rc);
        for (int64_t kb = 0; kb < g.per_row; ++kb)
          softmax_backward_block<Tag>(C, g, y, gy, gx, (n * H + r) * g.per_row + kb, s, false,
                                      RunPos{kb == 0, kb + 1 == g.per_row}, &rc);
      }
      leave_chunk(rr, t, P.get(), n, k);
    });
    gather_low_rows<Tag>(rr, P.get(), gx, nt);
  });
}

void one_hot(int64_t N, int64_t C, int64_t H, int64_t W, const Map3& labels, int64_t ignore_index, void* out,
             int elem_size, uint64_t one, int num_threads) {
  switch (elem_size) {
    case 1: one_hot_impl(N, C, H, W, labels, ignore_index, static_cast<uint8_t*>(out), uint8_t(one), num_threads); break;
    case 2: one_hot_impl(N, C, H, W, labels, ignore_index, static_cast<uint16_t*>(out), uint16_t(one), num_threads); break;
    case 4: one_hot_impl(N, C, H, W, labels, ignore_index, static_cast<uint32_t*>(out), uint32_t(one), num_threads); break;
    case 8: one_hot_impl(N, C, H, W, labels, ignore_index, static_cast<uint64_t*>(out), uint64_t(one), num_threads); break;
    default: throw std::invalid_argument("one_hot: unsupported element size");
  }
}

std::vector<int64_t> find_bad_labels(int64_t N, int64_t H, int64_t W, const Map3& labels, int64_t C,
                                     int64_t ignore_index, int num_threads) {
  const int64_t B = 4096, total = N * H * W;
  const int64_t nblocks = (total + B - 1) / B;
  std::vector<int64_t> count(nblocks, 0), first(nblocks, -1);  // first: pixel index of the block's first bad one
  for_blocks(nblocks, threads_for(num_threads, 4 * total), 2 * B, [&](int64_t blk, float* scratch) {
    int64_t* lab = reinterpret_cast<int64_t*>(scratch);
    const int64_t j0 = blk * B, len = std::min(B, total - j0);
    gather_map<int64_t>(labels, H, W, j0, len, lab);
    const uint64_t classes = static_cast<uint64_t>(C);
    int64_t bad = 0;
    for (int64_t b = 0; b < len; ++b) {  // (unsigned: one compare finds v < 0 and v >= C)
      const int64_t v = lab[b];
      bad += (static_cast<uint64_t>(v) >= classes) & (v != ignore_index);
    }
    count[blk] = bad;
    if (bad)
      for (int64_t b = 0; b < len; ++b) {
        const int64_t v = lab[b];
        if ((v < 0 || v >= C) && v != ignore_index) {
          first[blk] = j0 + b;
          break;
        }
      }
  });
  int64_t bad = 0, value = 0;
  bool found = false;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    bad += count[blk];
    if (!found && first[blk] >= 0) {
      const int64_t j = first[blk];
      value = labels.at<int64_t>(j / (H * W), (j / W) % H, j % W);
      found = true;
    }
  }
  return {bad, value};
}

std::vector<double> bce_maps(const std::vector<BceArgs>& maps, int num_threads) {
  const int64_t B = 2048;
  const size_t nm = maps.size();
  // A resized map (z at (zH, zW)) is cut into blocks of whole rows, so that each row's gradient is transposed along
  // W by the thread that computes it (into tw, float (N, H, zW)); the H half follows the parallel pass.
  std::vector<ResizeAxis> ah(nm), aw(nm);
  std::vector<AxisPlan> pw(nm);
  std::vector<MapResize> mr(nm);
  std::vector<std::vector<float>> tw(nm);
  std::vector<int64_t> first(nm + 1, 0), blen(nm, B);  // first block of each map, its block length
  int64_t total = 0, longest = B, widest = 0, widest_low = 0, tag = 0;
  for (size_t i = 0; i < nm; ++i) {
    const BceArgs& m = maps[i];
    const int64_t np = m.N * m.H * m.W;
    const int64_t zH = m.zH ? m.zH : m.H, zW = m.zW ? m.zW : m.W;
    if ((zH != m.H || zW != m.W) && np > 0) {
      ah[i] = resize_axis(zH, m.H, m.align_corners);
      aw[i] = resize_axis(zW, m.W, m.align_corners);
      pw[i] = AxisPlan(aw[i]);
      mr[i] = {&ah[i], &pw[i], tag};
      tag += m.N * zH;
      blen[i] = std::max<int64_t>(1, B / m.W) * m.W;
      longest = std::max(longest, blen[i]);
      widest = std::max(widest, m.W);
      widest_low = std::max(widest_low, zW);
      if (m.grad) tw[i].assign(static_cast<size_t>(m.N * m.H * zW), 0.f);
    }
    first[i + 1] = first[i] + (np + blen[i] - 1) / blen[i];
    total += np;
  }
  const int64_t nblocks = first.back();
  std::vector<double> partial(static_cast<size_t>(2 * nblocks), 0.0);
  const int64_t stride = longest + kV;  // (a row's transpose reads up to kV past its end)
  const int64_t scratch = 4 * stride + (widest ? MapRows::floats(widest, widest_low) : 0);
  for_blocks(nblocks, threads_for(num_threads, 8 * total), scratch, [&](int64_t blk, float* s) {
    size_t i = 0;
    while (blk >= first[i + 1]) ++i;
    const BceArgs& m = maps[i];
    const int64_t j0 = (blk - first[i]) * blen[i], end = std::min(m.N * m.H * m.W, j0 + blen[i]);
    float* zb = s;  // strided reads first, then the math on pixel vectors (arrays padded to whole ones)
    float* tb = zb + stride;  // the target, then (resized with a gradient) each pixel's gradient
    float* lb = tb + stride;
    int32_t* ib = reinterpret_cast<int32_t*>(lb + stride);
    const int64_t len = end - j0;
    const int64_t padded = (len + kV - 1) / kV * kV;
    const bool resized = mr[i].ah != nullptr;
    if (resized) {
      MapRows rows(s + 4 * stride, widest);
      resize_map(m.z, mr[i], m.H, m.W, j0, len, zb, rows);
    } else {
      gather_map<float>(m.z, m.H, m.W, j0, len, zb);
    }
    if (m.target.ptr) {
      gather_map<float>(m.target, m.H, m.W, j0, len, tb);
    } else {
      for (int64_t b = 0; b < len; ++b) tb[b] = m.target_value;
    }
    if (m.mask.ptr) {
      gather_map<uint8_t>(m.mask, m.H, m.W, j0, len, ib);
    } else {
      for (int64_t b = 0; b < len; ++b) ib[b] = 0;
    }
    for (int64_t b = len; b < padded; ++b) {
      zb[b] = 0.f;
      tb[b] = 0.f;
      ib[b] = 1;
    }
    float* gb = m.grad ? (resized ? tb : m.grad + j0) : nullptr;
    const vf grad_scale = vsplat(m.grad_scale);
    for (int64_t b = 0; b < padded; b += kV) {
      const vf z = vload(zb + b), t = vload(tb + b), e = vexp_neg_abs(z);
      const vi ignored = vload_i(ib + b) != 0;
      const DiscTerms d = vdisc_terms(z, e, t);
      vstore(lb + b, vselect(ignored, vf{}, d.bce));  // a select: NaN at an ignored pixel stays out
      if (gb) vstore_n(gb + b, vselect(ignored, vf{}, (d.sigmoid - t) * grad_scale), len - b);
    }
    if (resized && m.grad) {  // (whole rows, from row j0 / W on)
      const int64_t zW = aw[i].in;
      for (int64_t q = 0; q < len; q += m.W) pw[i].transpose(tb + q, tw[i].data() + (j0 + q) / m.W * zW);
    }
    const double loss = sum_fixed(lb, len);
    const double count = static_cast<double>(len - count_nonzero(ib, len));
    if (m.loss_map) std::copy(lb, lb + len, m.loss_map + j0);
    partial[blk] = loss;
    partial[nblocks + blk] = count;
  });
  for (size_t i = 0; i < nm; ++i)
    if (mr[i].ah && maps[i].grad) gather_map_grad(ah[i], maps[i].N, aw[i].in, tw[i].data(), maps[i].grad);
  std::vector<double> out(2 * maps.size(), 0.0);
  for (size_t i = 0; i < maps.size(); ++i)
    for (int64_t blk = first[i]; blk < first[i + 1]; ++blk) {
      out[2 * i] += partial[blk];
      out[2 * i + 1] += partial[nblocks + blk];
    }
  return out;
}

}  // namespace FAS_ISA
}  // namespace fas
