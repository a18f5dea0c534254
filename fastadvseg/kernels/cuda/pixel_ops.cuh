// The per-pixel work of every op, one function per op: what one thread does for pixel p (reads its C logits,
// writes its outputs and gradients, adds to its running raw sums, records bad labels). The kernels in *.cu are a
// grid-stride loop over p around these plus the deterministic block reductions; tests/cuda_emulation runs the
// same functions on the CPU.
// Math per op: see the header of its .cu file.
#pragma once

#include "common.cuh"

namespace fastadvseg {
namespace cuda {

// ---------------------------------------------------------------------------------------------------- softmax2d
struct SoftmaxArgs {
  Shape4 s;
  Strided4 x, y;       // forward: y = softmax(x)
  Strided4 p, gy, gx;  // backward: gx = p * (gy - <p, gy>) from the saved probabilities p = y
};

template <typename T>
FAS_HD void softmax_forward_pixel(const SoftmaxArgs& a, int64_t p) {
  const T* __restrict__ xp = static_cast<const T*>(a.x.data);
  T* __restrict__ yp = static_cast<T*>(a.y.data);
  const Pixel px = split_pixel(p, a.s.H * a.s.W, a.s.W);
  const int64_t xb = offset4(a.x, px), yb = offset4(a.y, px), ysc = a.y.sc;
  const RowStats r = row_stats<T, false>(xp, xb, a.x.sc, a.s.C, -1);
  const float inv_s = 1.f / r.s;
  for_channels(xp, xb, a.x.sc, 0, a.s.C,
               [&](int64_t c, float v) { yp[yb + c * ysc] = from_float<T>(expf(v - r.m) * inv_s); });
}

// The backward reads the saved probabilities (no recomputation from the logits): two sweeps over p and gy, the
// second from L1/L2; float32 math whatever the storage dtype.
template <typename T>
FAS_HD void softmax_backward_pixel(const SoftmaxArgs& a, int64_t p) {
  const T* __restrict__ pp = static_cast<const T*>(a.p.data);
  const T* __restrict__ gyp = static_cast<const T*>(a.gy.data);
  T* __restrict__ gxp = static_cast<T*>(a.gx.data);
  const Pixel px = split_pixel(p, a.s.H * a.s.W, a.s.W);
  const int64_t pb = offset4(a.p, px), gyb = offset4(a.gy, px), gxb = offset4(a.gx, px);
  const int64_t gysc = a.gy.sc, gxsc = a.gx.sc;
  float dot = 0.f;
  for_channels(pp, pb, a.p.sc, 0, a.s.C, [&](int64_t c, float v) { dot += v * to_float(gyp[gyb + c * gysc]); });
  for_channels(pp, pb, a.p.sc, 0, a.s.C, [&](int64_t c, float v) {
    gxp[gxb + c * gxsc] = from_float<T>(v * (to_float(gyp[gyb + c * gysc]) - dot));
  });
}

// ---------------------------------------------------------------------------------------------- cross_entropy2d
struct CrossEntropyArgs {
  Shape4 s;
  Strided4 x;
  Strided3 target;
  int64_t ignore_index;
  Smoothing sm;         // sm.weight: the C class weights, or nullptr; keep/each used only when kSmooth
  float* loss_map;      // P floats, or nullptr
  Strided4 grad;        // data nullptr: no gradient
};

// acc: [sum of the losses, sum of w_y, bad labels]; first_bad: the smallest pixel with a bad label seen.
// kSmooth: label smoothing eps != 0 (eps = 0 is the plain instantiation, which costs nothing extra).
template <typename T, bool kSmooth>
FAS_HD void cross_entropy_pixel(const CrossEntropyArgs& a, int64_t p, float* acc, int64_t& first_bad) {
  const T* __restrict__ xp = static_cast<const T*>(a.x.data);
  T* __restrict__ gp = static_cast<T*>(a.grad.data);
  const Pixel px = split_pixel(p, a.s.H * a.s.W, a.s.W);
  const int64_t y = checked_label(a.target, px, p, a.s.C, a.ignore_index, acc[2], first_bad);
  float loss = 0.f;
  if (y >= 0) {  // the logits of an uncounted pixel are never read: a NaN there cannot reach the loss
    const int64_t xb = offset4(a.x, px);
    const RowStats r = row_stats<T, false, kSmooth>(xp, xb, a.x.sc, a.s.C, y, a.sm.weight);
    const float wy = a.sm.weight != nullptr ? a.sm.weight[y] : 1.f;
    loss = ce_loss<kSmooth>(r, wy, a.sm);
    acc[0] += loss;
    acc[1] += wy;
    if (gp != nullptr) {
      write_nll_grad<T, kSmooth>(xp, xb, a.x.sc, gp, offset4(a.grad, px), a.grad.sc, a.s.C, r, y,
                                 kSmooth ? a.sm.keep * wy : wy, a.sm);
    }
  } else if (gp != nullptr) {
    write_zeros<T>(gp, offset4(a.grad, px), a.grad.sc, a.s.C);
  }
  if (a.loss_map != nullptr) a.loss_map[p] = loss;
}

// ------------------------------------------------------------------------------- bce_with_logits2d, discriminator
struct BceSegment {
  int64_t H, W, P;
  Strided3 z, target, mask, grad;  // target.data nullptr: the constant target_value
  float target_value;
  float* loss_map;
};

// sum += BCE(z, t), count += 1 at a pixel that is not masked; gradient sigmoid(z) - t (0 where masked).
FAS_HD void bce_pixel(const BceSegment& seg, int64_t p, float& sum, float& count) {
  const Pixel px = split_pixel(p, seg.H * seg.W, seg.W);
  float loss = 0.f;
  if (!masked(seg.mask, px)) {
    const float z = load_map(seg.z, offset3(seg.z, px));
    const float t = seg.target.data != nullptr ? load_map(seg.target, offset3(seg.target, px)) : seg.target_value;
    loss = bce_logits(z, t);
    sum += loss;
    count += 1.f;
    if (seg.grad.data != nullptr) store_map(seg.grad, offset3(seg.grad, px), sigmoid(z) - t);
  } else if (seg.grad.data != nullptr) {
    store_map(seg.grad, offset3(seg.grad, px), 0.f);
  }
  if (seg.loss_map != nullptr) seg.loss_map[p] = loss;
}

// Two segments walked as one index space q (the first's pixels, then the second's).
// acc: [first sum, first count, second sum, second count]
FAS_HD void bce_pair_pixel(const BceSegment& first, const BceSegment& second, int64_t q, float* acc) {
  if (q < first.P) {
    bce_pixel(first, q, acc[0], acc[1]);
  } else {
    bce_pixel(second, q - first.P, acc[2], acc[3]);
  }
}

// ----------------------------------------------------------------------------------------- semi_cross_entropy2d
// The keep rule of L_semi, one formula for every backend (fastadvseg/_keep.py): sigmoid(z) > T is decided as
// float32(z) > logit(float32(T)), compared as real numbers, i.e. z > keep_logit with the float32 constant
//   keep_logit = logit(T) in double (log1p((2T - 1) / (1 - T)) for T in [1/4, 3/4], where log(T) - log1p(-T)
//                would cancel; 2T - 1 and 1 - T are exact), rounded *down* to float32,
// so that the float32 comparison is exact. T <= 0 gives -inf (every z kept but -inf and NaN, also z far below -88
// where a float32 sigmoid is 0), T >= 1 gives +inf (nothing kept); a NaN z is never kept. Host code, run once per
// call where the launcher (or tests/cuda_emulation) builds SemiArgs / GeneratorArgs from T; the same operations as
// fastadvseg/_keep.py and the cpu backend's keep_logit (csrc/cpu/kernels_impl.h), so every backend keeps the same
// pixels.
inline float keep_logit_of(float threshold) {
  const double t = static_cast<double>(threshold);
  if (t <= 0.0) return -std::numeric_limits<float>::infinity();
  if (t >= 1.0) return std::numeric_limits<float>::infinity();
  const double exact = (t >= 0.25 && t <= 0.75) ? log1p((2.0 * t - 1.0) / (1.0 - t)) : log(t) - log1p(-t);
  const float low = static_cast<float>(exact);
  return static_cast<double>(low) > exact ? nextafterf(low, -std::numeric_limits<float>::infinity()) : low;
}

// z > keep_logit, false for a NaN z (keep_logit is never NaN). Written as !(z <= keep_logit) && !isnan(z), which
// is the same: with a plain `z > keep_logit` ptxas spilled 12 bytes in generator_kernel (sm_90, nvcc 13.0; see
// python -m fastadvseg.kernels.triton.compile_check).
FAS_HD bool keep_pixel(float z, float keep_logit) { return !(z <= keep_logit) && !isnan(z); }

struct SemiArgs {
  Shape4 s;
  Strided4 x;
  Strided3 z, mask;
  float keep_logit;  // keep_logit_of(T): a pixel is kept where z > keep_logit (keep_pixel)
  float* loss_map;
  Strided4 grad;

  // from the threshold T, on the host: keep_logit computed here, once per call
  SemiArgs(Shape4 s_, Strided4 x_, Strided3 z_, Strided3 mask_, float threshold, float* loss_map_, Strided4 grad_)
      : s(s_), x(x_), z(z_), mask(mask_), keep_logit(keep_logit_of(threshold)), loss_map(loss_map_), grad(grad_) {}
};

// acc: [sum of nll over kept pixels, kept, considered]
template <typename T>
FAS_HD void semi_pixel(const SemiArgs& a, int64_t p, float* acc) {
  const T* __restrict__ xp = static_cast<const T*>(a.x.data);
  T* __restrict__ gp = static_cast<T*>(a.grad.data);
  const Pixel px = split_pixel(p, a.s.H * a.s.W, a.s.W);
  bool keep = false;
  if (!masked(a.mask, px)) {
    acc[2] += 1.f;
    keep = keep_pixel(load_map(a.z, offset3(a.z, px)), a.keep_logit);
  }
  float loss = 0.f;
  if (keep) {
    const int64_t xb = offset4(a.x, px);
    const RowStats r = row_stats<T, true>(xp, xb, a.x.sc, a.s.C, -1);
    loss = r.m + logf(r.s) - r.xsel;
    acc[0] += loss;
    acc[1] += 1.f;
    if (gp != nullptr) write_nll_grad<T>(xp, xb, a.x.sc, gp, offset4(a.grad, px), a.grad.sc, a.s.C, r, r.arg, 1.f);
  } else if (gp != nullptr) {
    write_zeros<T>(gp, offset4(a.grad, px), a.grad.sc, a.s.C);
  }
  if (a.loss_map != nullptr) a.loss_map[p] = loss;
}

// ----------------------------------------------------------------------------------------------- generator_loss
struct GeneratorArgs {
  Shape4 s;
  Strided4 x;
  Strided3 z, target;  // target.data nullptr: an unlabelled batch
  int64_t ignore_index;
  float keep_logit;    // unlabelled: keep_logit_of(T), a pixel is kept where z > keep_logit (keep_pixel)
  Strided4 grad_x;     // d(term sum)/dx: cross-entropy (labelled) or L_semi (unlabelled), or absent
  Strided3 grad_z;     // d(adv sum)/dz, or absent

  // from the threshold T, on the host: keep_logit computed here, once per call
  GeneratorArgs(Shape4 s_, Strided4 x_, Strided3 z_, Strided3 target_, int64_t ignore_index_, float threshold,
                Strided4 grad_x_, Strided3 grad_z_)
      : s(s_), x(x_), z(z_), target(target_), ignore_index(ignore_index_), keep_logit(keep_logit_of(threshold)),
        grad_x(grad_x_), grad_z(grad_z_) {}
};

// acc: [term sum, term count, adv sum, adv count, kept, considered, bad labels]; first_bad as in cross_entropy.
template <typename T>
FAS_HD void generator_pixel(const GeneratorArgs& a, int64_t p, float* acc, int64_t& first_bad) {
  const T* __restrict__ xp = static_cast<const T*>(a.x.data);
  T* __restrict__ gxp = static_cast<T*>(a.grad_x.data);
  const Pixel px = split_pixel(p, a.s.H * a.s.W, a.s.W);
  const int64_t xb = offset4(a.x, px);
  int64_t sel = -1;  // the class whose nll counts in the term at this pixel, -1 if none
  bool adv_counts;   // whether BCE(z, 1) counts at this pixel
  float zv = 0.f;
  RowStats r{};
  if (a.target.data != nullptr) {  // labelled: cross-entropy and adv over the pixels with a valid label
    sel = checked_label(a.target, px, p, a.s.C, a.ignore_index, acc[6], first_bad);
    adv_counts = sel >= 0;
    if (sel >= 0) {
      zv = load_map(a.z, offset3(a.z, px));
      r = row_stats<T, false>(xp, xb, a.x.sc, a.s.C, sel);
    }
  } else {  // unlabelled: adv over every pixel, L_semi over the confident ones
    adv_counts = true;
    zv = load_map(a.z, offset3(a.z, px));
    acc[5] += 1.f;
    if (keep_pixel(zv, a.keep_logit)) {
      r = row_stats<T, true>(xp, xb, a.x.sc, a.s.C, -1);
      sel = r.arg;
      acc[4] += 1.f;
    }
  }
  if (sel >= 0) {
    acc[0] += r.m + logf(r.s) - r.xsel;
    acc[1] += 1.f;
  }
  if (adv_counts) {
    acc[2] += bce_logits(zv, 1.f);
    acc[3] += 1.f;
  }
  if (a.grad_z.data != nullptr) store_map(a.grad_z, offset3(a.grad_z, px), adv_counts ? sigmoid(zv) - 1.f : 0.f);
  if (gxp != nullptr) {
    if (sel >= 0) {
      write_nll_grad<T>(xp, xb, a.x.sc, gxp, offset4(a.grad_x, px), a.grad_x.sc, a.s.C, r, sel, 1.f);
    } else {
      write_zeros<T>(gxp, offset4(a.grad_x, px), a.grad_x.sc, a.s.C);
    }
  }
}

// ---------------------------------------------------------------------------------------------------- one_hot2d
// out: contiguous (N, C, H, W) of U-sized elements; `one` is the bit pattern of 1 in the output dtype.
template <typename U>
FAS_HD void one_hot_pixel(const Shape4& s, const Strided3& target, int64_t ignore_index, U* __restrict__ out, U one,
                          int64_t p) {
  const int64_t HW = s.H * s.W;
  const Pixel px = split_pixel(p, HW, s.W);
  const int64_t y = valid_label(target, px, s.C, ignore_index);
  U* o = out + px.n * s.C * HW + (p - px.n * HW);
  for (int64_t c = 0; c < s.C; ++c) o[c * HW] = (c == y) ? one : static_cast<U>(0);
}

}  // namespace cuda
}  // namespace fastadvseg
