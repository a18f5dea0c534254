// The per-pixel work of every op, one function per op: what one thread does for pixel p (reads its C logits,
// writes its outputs and gradients, adds to its running raw sums, records bad labels), and what one thread does
// for one element of the gradient of an upsampled input (the gathers at the end). The kernels in *.cu are a
// grid-stride loop around these plus the deterministic block reductions; tests/cuda_emulation runs the same
// functions on the CPU.
// Math per op: see the header of its .cu file.
#pragma once

#include "common.cuh"

namespace fastadvseg {
namespace cuda {

// ------------------------------------------------------------------------- where the logits of a pixel come from
// The loss functions below take the logits of label-grid pixel px through a placement:
//  * AtLabelGrid: the logits are at the labels' resolution, read in place, and the gradient of each channel is
//    written at the pixel (grad.data nullptr: none);
//  * Upsampled: the logits (N, C, h, w) are bilinearly upsampled to the label grid, interpolated at each pixel;
//    their gradient is gathered at (h, w) afterwards (logit_grad_element) from what the pixel leaves in `state`:
//    its log-sum-exp and the class whose -log p counts there (-1: none). state nullptr: no gradient.

// What the gather of an upsampled logits' gradient reads of one label-grid pixel (kLogitStateBytes of scratch).
struct alignas(8) LogitState {
  float lse;
  int32_t sel;
};
static_assert(sizeof(LogitState) == kLogitStateBytes, "the binding allocates kLogitStateBytes per pixel");

struct AtLabelGrid {
  template <typename T>
  FAS_HD StoredAt logits(const Strided4& x, const Pixel& px) const { return StoredAt{offset4(x, px), x.sc}; }
  // a pixel whose -log softmax(x)_sel counts, with gradient scale * (p - onehot(sel)) (+ smoothing)
  template <typename T, bool kSmooth>
  FAS_HD void counted(const T* __restrict__ x, const StoredAt& at, const Strided4& grad, const Pixel& px, int64_t,
                      int64_t C, const RowStats& r, int64_t sel, float scale, const Smoothing& sm) const {
    if (grad.data != nullptr) {
      write_nll_grad<T, kSmooth>(x, at.base, at.sc, static_cast<T*>(grad.data), offset4(grad, px), grad.sc, C, r,
                                 sel, scale, sm);
    }
  }
  template <typename T>
  FAS_HD void uncounted(const Strided4& grad, const Pixel& px, int64_t, int64_t C) const {
    if (grad.data != nullptr) write_zeros<T>(static_cast<T*>(grad.data), offset4(grad, px), grad.sc, C);
  }
};

struct Upsampled {
  Axis rows, cols;    // the logits' h -> H and w -> W
  LogitState* state;  // (N, H, W), contiguous, or nullptr
  template <typename T>
  FAS_HD InterpolatedAt logits(const Strided4& x, const Pixel& px) const {
    return interpolated_at(x, px.n, taps_at(rows, px.h), taps_at(cols, px.w));
  }
  // the scale is not kept: the gather derives it from sel (the op's class weight, 1 for the other losses)
  template <typename T, bool kSmooth>
  FAS_HD void counted(const T*, const InterpolatedAt&, const Strided4&, const Pixel&, int64_t p, int64_t,
                      const RowStats& r, int64_t sel, float, const Smoothing&) const {
    if (state != nullptr) state[p] = LogitState{r.m + logf(r.s), static_cast<int32_t>(sel)};
  }
  template <typename T>
  FAS_HD void uncounted(const Strided4&, const Pixel&, int64_t p, int64_t) const {
    if (state != nullptr) state[p] = LogitState{0.f, -1};
  }
};

inline Upsampled make_upsampled(const Upsample& up, int64_t H, int64_t W) {
  return Upsampled{make_axis(up.h, H, up.align_corners), make_axis(up.w, W, up.align_corners),
                   static_cast<LogitState*>(up.scratch)};
}

// The losses without class weights or smoothing: scale 1 at every counted pixel.
FAS_HD Smoothing no_smoothing() { return Smoothing{1.f, 0.f, nullptr}; }

// ---------------------------------------------------------------------------------------------------- softmax2d
struct SoftmaxArgs {
  Shape4 s;
  Strided4 x, y;       // forward: y = softmax(x)
  Strided4 p, gy, gx;  // backward: gx = p * (gy - <p, gy>) from the saved probabilities p = y
};

// y at pixel px (of a.s's grid) = softmax of the logits the placement gives there (a.s.C channels).
template <typename T, typename Place = AtLabelGrid>
FAS_HD void softmax_forward_pixel(const SoftmaxArgs& a, int64_t p, const Place& place = Place{}) {
  const T* __restrict__ xp = static_cast<const T*>(a.x.data);
  T* __restrict__ yp = static_cast<T*>(a.y.data);
  const Pixel px = split_pixel(p, a.s.H * a.s.W, a.s.W);
  const auto at = place.template logits<T>(a.x, px);
  const int64_t yb = offset4(a.y, px), ysc = a.y.sc;
  const RowStats r = row_stats_of<false>(xp, at, a.s.C, -1);
  const float inv_s = 1.f / r.s;
  for_channels(xp, at, 0, a.s.C,
               [&](int64_t c, float v) { yp[yb + c * ysc] = from_float<T>(expf(v - r.m) * inv_s); });
}

// sum_c p_c gy_c of one pixel, in float32 whatever the storage dtype.
template <typename T>
FAS_HD float softmax_dot(const T* __restrict__ pp, int64_t pb, int64_t psc, const T* __restrict__ gyp, int64_t gyb,
                         int64_t gysc, int64_t C) {
  float dot = 0.f;
  for_channels(pp, pb, psc, 0, C, [&](int64_t c, float v) { dot += v * to_float(gyp[gyb + c * gysc]); });
  return dot;
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
  const float dot = softmax_dot(pp, pb, a.p.sc, gyp, gyb, gysc, a.s.C);
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
template <typename T, bool kSmooth, typename Place = AtLabelGrid>
FAS_HD void cross_entropy_pixel(const CrossEntropyArgs& a, int64_t p, float* acc, int64_t& first_bad,
                                const Place& place = Place{}) {
  const T* __restrict__ xp = static_cast<const T*>(a.x.data);
  const Pixel px = split_pixel(p, a.s.H * a.s.W, a.s.W);
  const int64_t y = checked_label(a.target, px, p, a.s.C, a.ignore_index, acc[2], first_bad);
  float loss = 0.f;
  if (y >= 0) {  // the logits of an uncounted pixel are never read: a NaN there cannot reach the loss
    const auto at = place.template logits<T>(a.x, px);
    const RowStats r = row_stats_of<false, kSmooth>(xp, at, a.s.C, y, a.sm.weight);
    const float wy = a.sm.weight != nullptr ? a.sm.weight[y] : 1.f;
    loss = ce_loss<kSmooth>(r, wy, a.sm);
    acc[0] += loss;
    acc[1] += wy;
    place.template counted<T, kSmooth>(xp, at, a.grad, px, p, a.s.C, r, y, kSmooth ? a.sm.keep * wy : wy, a.sm);
  } else {
    place.template uncounted<T>(a.grad, px, p, a.s.C);
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

// ----------------------------------------------------------- semi_cross_entropy2d, pseudo_label_cross_entropy2d
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

// The confidence test of the pseudo-label loss: the teacher's max softmax 1 / sum_c exp(t_c - max_c t) (1 / s of
// its statistics, in float32) >= tau when `test`, else every pixel passes. A teacher pixel whose maximum is
// infinite is never confident, as in the reference (t_c - max is NaN for some c there: a +inf makes s NaN anyway,
// all -inf would give s = C); a NaN anywhere makes s NaN, and NaN >= tau is false.
struct Confidence {
  bool test;
  float tau;
  FAS_HD bool passes(const RowStats& t) const { return !test || (!isinf(t.m) && 1.f / t.s >= tau); }
};

// The pseudo-label loss, of which L_semi is the case without a teacher or a confidence test: the student's logits
// x, the teacher's (teacher.data nullptr: x itself, one pass giving both), the D map z at the label grid
// (z.data nullptr: no D test) and the ignore mask.
struct PseudoLabelArgs {
  Shape4 s;
  Strided4 x, teacher;
  Strided3 z, mask;
  float keep_logit;  // keep_logit_of(T): the D test passes where z > keep_logit (keep_pixel)
  Confidence confidence;
  float* loss_map;
  Strided4 grad;

  // from the thresholds, on the host: keep_logit computed here, once per call
  PseudoLabelArgs(Shape4 s_, Strided4 x_, Strided4 teacher_, Strided3 z_, Strided3 mask_, float d_threshold,
                  Confidence confidence_, float* loss_map_, Strided4 grad_)
      : s(s_), x(x_), teacher(teacher_), z(z_), mask(mask_), keep_logit(keep_logit_of(d_threshold)),
        confidence(confidence_), loss_map(loss_map_), grad(grad_) {}
};

// L_semi: the student's own argmax where the D test passes (z always given), no confidence test.
struct SemiArgs : PseudoLabelArgs {
  SemiArgs(Shape4 s_, Strided4 x_, Strided3 z_, Strided3 mask_, float threshold, float* loss_map_, Strided4 grad_)
      : PseudoLabelArgs(s_, x_, Strided4{}, z_, mask_, threshold, Confidence{false, 0.f}, loss_map_, grad_) {}
};

// Where the teacher's logits of a pixel come from: OwnLogits (no teacher: the student's own, whose one pass gives
// the pseudo-label and the loss), or a placement of the teacher tensor (AtLabelGrid: read in place; Upsampled:
// interpolated from its own grid, its state nullptr), of which only the logits reader is used.
struct OwnLogits {};

// The student's statistics r at a pixel whose teacher is confident, with r.arg the pseudo-label and r.xsel the
// student's logit there; false (r untouched) where the teacher is not confident.
template <typename T, typename R>
FAS_HD bool pseudo_label_stats(const OwnLogits&, const PseudoLabelArgs& a, const T* __restrict__ xp, const R& at,
                               const Pixel&, RowStats& r) {
  const RowStats own = row_stats_of<true>(xp, at, a.s.C, -1);  // its xsel: x at the first maximum
  if (!a.confidence.passes(own)) return false;
  r = own;
  return true;
}

template <typename T, typename R, typename Teacher>
FAS_HD bool pseudo_label_stats(const Teacher& teacher, const PseudoLabelArgs& a, const T* __restrict__ xp,
                               const R& at, const Pixel& px, RowStats& r) {
  const T* __restrict__ tp = static_cast<const T*>(a.teacher.data);
  const RowStats t = row_stats_of<true>(tp, teacher.template logits<T>(a.teacher, px), a.s.C, -1);
  if (!a.confidence.passes(t)) return false;
  r = row_stats_of<false>(xp, at, a.s.C, t.arg);
  r.arg = t.arg;
  return true;
}

// acc: [sum of nll over kept pixels, kept, considered]. z is read at considered pixels only, the teacher's logits
// only where the D test passes, the student's only at kept pixels (without a teacher: where the D test passes),
// so NaN/Inf anywhere else never reaches the loss or the gradient.
template <typename T, typename Place = AtLabelGrid, typename Teacher = OwnLogits>
FAS_HD void pseudo_label_pixel(const PseudoLabelArgs& a, int64_t p, float* acc, const Place& place = Place{},
                               const Teacher& teacher = Teacher{}) {
  const T* __restrict__ xp = static_cast<const T*>(a.x.data);
  const Pixel px = split_pixel(p, a.s.H * a.s.W, a.s.W);
  bool keep = false;
  if (!masked(a.mask, px)) {
    acc[2] += 1.f;
    keep = a.z.data == nullptr || keep_pixel(load_map(a.z, offset3(a.z, px)), a.keep_logit);
  }
  float loss = 0.f;
  if (keep) {
    const auto at = place.template logits<T>(a.x, px);
    RowStats r{};
    keep = pseudo_label_stats<T>(teacher, a, xp, at, px, r);
    if (keep) {
      loss = r.m + logf(r.s) - r.xsel;
      acc[0] += loss;
      acc[1] += 1.f;
      place.template counted<T, false>(xp, at, a.grad, px, p, a.s.C, r, r.arg, 1.f, no_smoothing());
    }
  }
  if (!keep) place.template uncounted<T>(a.grad, px, p, a.s.C);
  if (a.loss_map != nullptr) a.loss_map[p] = loss;
}

template <typename T, typename Place = AtLabelGrid>
FAS_HD void semi_pixel(const SemiArgs& a, int64_t p, float* acc, const Place& place = Place{}) {
  pseudo_label_pixel<T>(a, p, acc, place, OwnLogits{});
}

// Calls launch(T{}, place, teacher) with the logits' element type and the placements of the student (AtLabelGrid
// where x_up's grid is the label grid, else Upsampled with x_up.scratch as its state) and of the teacher
// (OwnLogits without one, AtLabelGrid at the label grid, else Upsampled without state): the pseudo-label kernel is
// instantiated for these 3 x 2 x 3 combinations. The launcher and tests/cuda_emulation choose through it alike.
template <typename F>
inline cudaError_t dispatch_pseudo_label(const Shape4& s, int dtype, const Upsample& x_up, bool has_teacher,
                                         const Upsample& teacher_up, F&& launch) {
  const bool x_at_grid = x_up.h == s.H && x_up.w == s.W;
  const bool t_at_grid = teacher_up.h == s.H && teacher_up.w == s.W;
  const Upsampled x_place = make_upsampled(x_up, s.H, s.W);
  const Upsampled t_place =
      make_upsampled(Upsample{teacher_up.h, teacher_up.w, teacher_up.align_corners, nullptr}, s.H, s.W);
  return dispatch_logits(dtype, [&](auto tag) {
    const auto with_teacher = [&](const auto& place) {
      if (!has_teacher) return launch(tag, place, OwnLogits{});
      if (t_at_grid) return launch(tag, place, AtLabelGrid{});
      return launch(tag, place, t_place);
    };
    return x_at_grid ? with_teacher(AtLabelGrid{}) : with_teacher(x_place);
  });
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
template <typename T, typename Place = AtLabelGrid>
FAS_HD void generator_pixel(const GeneratorArgs& a, int64_t p, float* acc, int64_t& first_bad,
                            const Place& place = Place{}) {
  const T* __restrict__ xp = static_cast<const T*>(a.x.data);
  const Pixel px = split_pixel(p, a.s.H * a.s.W, a.s.W);
  const auto at = place.template logits<T>(a.x, px);
  int64_t sel = -1;  // the class whose nll counts in the term at this pixel, -1 if none
  bool adv_counts;   // whether BCE(z, 1) counts at this pixel
  float zv = 0.f;
  RowStats r{};
  if (a.target.data != nullptr) {  // labelled: cross-entropy and adv over the pixels with a valid label
    sel = checked_label(a.target, px, p, a.s.C, a.ignore_index, acc[6], first_bad);
    adv_counts = sel >= 0;
    if (sel >= 0) {
      zv = load_map(a.z, offset3(a.z, px));
      r = row_stats_of<false>(xp, at, a.s.C, sel);
    }
  } else {  // unlabelled: adv over every pixel, L_semi over the confident ones
    adv_counts = true;
    zv = load_map(a.z, offset3(a.z, px));
    acc[5] += 1.f;
    if (keep_pixel(zv, a.keep_logit)) {
      r = row_stats_of<true>(xp, at, a.s.C, -1);
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
  if (sel >= 0) {
    place.template counted<T, false>(xp, at, a.grad_x, px, p, a.s.C, r, sel, 1.f, no_smoothing());
  } else {
    place.template uncounted<T>(a.grad_x, px, p, a.s.C);
  }
}

// ------------------------------------------------------------------------- gradients of upsampled inputs
// Each element of the gradient of an upsampled input sums, in a fixed order (gather_adjoint), the label-grid
// gradient of the pixels that read it times their bilinear weights: the adjoint of the upsampling, as a gather
// (deterministic, no atomics), with float32 accumulation. One thread per element; element q runs over the
// gradient's (N, C, h, w) (or (N, h, w)) in memory order of NCHW, so adjacent threads take adjacent columns.

// The upsampled logits' gradient from the state the loss kernel left per label-grid pixel: the label-grid gradient
// is nll_grad of p_c = exp(x_c - lse) with x_c interpolated again from the low-resolution logits, and the scale
// sm.keep * w[sel] (w = 1 without class weights: 1 for L_semi and the generator's terms); 0 where sel < 0.
struct LogitGradArgs {
  Shape4 s;                 // the logits' (N, C, h, w), also the gradient's
  int64_t H, W;             // the label grid
  Axis rows, cols;          // h -> H, w -> W
  Strided4 x, grad;         // the logits and their gradient (same dtype)
  const LogitState* state;  // (N, H, W), contiguous
  Smoothing sm;
};

template <typename T, bool kSmooth>
FAS_HD void logit_grad_element(const LogitGradArgs& a, int64_t q) {
  const T* __restrict__ xp = static_cast<const T*>(a.x.data);
  const float* __restrict__ w = a.sm.weight;
  const Pixel e = split_pixel(q, a.s.H * a.s.W, a.s.W);  // e.n = n * C + c
  const int64_t n = e.n / a.s.C, c = e.n - n * a.s.C;
  float wsum = 0.f;  // the sum row_stats forms at every pixel, in the same order
  if (kSmooth) {
    wsum = w != nullptr ? w[0] : 1.f;
    for (int64_t k = 1; k < a.s.C; ++k) wsum += w != nullptr ? w[k] : 1.f;
  }
  // channel c of image n at rows i - 1, i, i + 1 (the last clamped) and the same columns: what the label-grid
  // pixels reading (i, j) interpolate from (gather_adjoint's runs)
  const T* __restrict__ xc = xp + n * a.x.sn + c * a.x.sc;
  const int64_t ro[3] = {(e.h - 1) * a.x.sh, e.h * a.x.sh, (e.h + 1 < a.s.H ? e.h + 1 : e.h) * a.x.sh};
  const int64_t co[3] = {(e.w - 1) * a.x.sw, e.w * a.x.sw, (e.w + 1 < a.s.W ? e.w + 1 : e.w) * a.x.sw};
  const LogitState* __restrict__ st = a.state + n * a.H * a.W;
  const float g = gather_adjoint(a.rows, a.cols, e.h, e.w,
                                 [&](int64_t h, int64_t v, int hr, int wr, const Taps& th, const Taps& tw) {
    const LogitState s = st[h * a.W + v];
    if (s.sel < 0) return 0.f;  // a select: whatever the logits hold there never reaches the gradient
    const T* __restrict__ r0 = xc + ro[hr];
    const T* __restrict__ r1 = xc + ro[hr + 1];
    const float xv = blend(to_float(r0[co[wr]]), to_float(r0[co[wr + 1]]), to_float(r1[co[wr]]),
                           to_float(r1[co[wr + 1]]), th, tw);
    const float scale = a.sm.keep * (w != nullptr ? w[s.sel] : 1.f);
    return nll_grad<kSmooth>(expf(xv - s.lse), c, s.sel, scale, wsum, a.sm);
  });
  static_cast<T*>(a.grad.data)[n * a.grad.sn + c * a.grad.sc + e.h * a.grad.sh + e.w * a.grad.sw] = from_float<T>(g);
}

// The gather of the logits' gradient after a loss kernel on the label grid s ({N, C, H, W}) that left its state
// through `up`.
inline LogitGradArgs make_logit_grad(const Shape4& s, const Strided4& x, const Upsampled& up, const Strided4& grad,
                                     const Smoothing& sm) {
  return LogitGradArgs{Shape4{s.N, s.C, up.rows.in, up.cols.in}, s.H, s.W, up.rows, up.cols, x, grad, up.state, sm};
}

// Launches logit_grad_element over the gradient (defined in upsample.cu; kSmooth = smooth).
cudaError_t launch_logit_grad(const LogitGradArgs& a, int dtype, bool smooth, cudaStream_t stream);

// softmax2d's gradient at the logits' resolution from the saved label-grid probabilities p and the incoming
// gradient gy: the label-grid gradient p_c (gy_c - dot), dot = sum_k p_k gy_k (softmax_dot_pixel, first).
struct SoftmaxGradArgs {
  Shape4 s;         // the gradient's (N, C, h, w)
  int64_t H, W;     // p's and gy's grid
  Axis rows, cols;  // h -> H, w -> W
  Strided4 p, gy, gx;
  float* dot;       // (N, H, W), contiguous
};

template <typename T>
FAS_HD void softmax_dot_pixel(const SoftmaxGradArgs& a, int64_t p) {
  const Pixel px = split_pixel(p, a.H * a.W, a.W);
  a.dot[p] = softmax_dot(static_cast<const T*>(a.p.data), offset4(a.p, px), a.p.sc,
                         static_cast<const T*>(a.gy.data), offset4(a.gy, px), a.gy.sc, a.s.C);
}

template <typename T>
FAS_HD void softmax_grad_element(const SoftmaxGradArgs& a, int64_t q) {
  const T* __restrict__ pp = static_cast<const T*>(a.p.data);
  const T* __restrict__ gyp = static_cast<const T*>(a.gy.data);
  const Pixel e = split_pixel(q, a.s.H * a.s.W, a.s.W);  // e.n = n * C + c
  const int64_t n = e.n / a.s.C, c = e.n - n * a.s.C;
  const int64_t pc = n * a.p.sn + c * a.p.sc, gc = n * a.gy.sn + c * a.gy.sc;
  const float* __restrict__ dot = a.dot + n * a.H * a.W;
  const float g = gather_adjoint(a.rows, a.cols, e.h, e.w,
                                 [&](int64_t h, int64_t w, int, int, const Taps&, const Taps&) {
    return to_float(pp[pc + h * a.p.sh + w * a.p.sw]) * (to_float(gyp[gc + h * a.gy.sh + w * a.gy.sw]) - dot[h * a.W + w]);
  });
  static_cast<T*>(a.gx.data)[n * a.gx.sn + c * a.gx.sc + e.h * a.gx.sh + e.w * a.gx.sw] = from_float<T>(g);
}

// A discriminator map (N, h, w) (any float dtype) bilinearly upsampled to a float32 (N, H, W) map, and the
// gradient of such a map, given as float32 (N, H, W), reduced to (N, h, w) in the map's dtype.
struct MapResample {
  int64_t N, H, W;     // the label grid
  Axis rows, cols;     // h -> H, w -> W
  Strided3 low;        // (N, h, w): the map (upsample) or its gradient (gather)
  float* full;         // (N, H, W), contiguous: the upsampled map (upsample) or its gradient (gather)
};

FAS_HD void map_upsample_pixel(const MapResample& a, int64_t p) {
  const Pixel px = split_pixel(p, a.H * a.W, a.W);
  const Taps th = taps_at(a.rows, px.h), tw = taps_at(a.cols, px.w);
  const int64_t b = px.n * a.low.sn, r0 = b + th.i0 * a.low.sh, r1 = b + th.i1 * a.low.sh;
  const int64_t c0 = tw.i0 * a.low.sw, c1 = tw.i1 * a.low.sw;
  a.full[p] = blend(load_map(a.low, r0 + c0), load_map(a.low, r0 + c1), load_map(a.low, r1 + c0),
                    load_map(a.low, r1 + c1), th, tw);
}

FAS_HD void map_grad_element(const MapResample& a, int64_t q) {
  const Pixel e = split_pixel(q, a.rows.in * a.cols.in, a.cols.in);
  const float* __restrict__ g = a.full + e.n * a.H * a.W;
  store_map(a.low, offset3(a.low, e),
            gather_adjoint(a.rows, a.cols, e.h, e.w,
                           [&](int64_t h, int64_t w, int, int, const Taps&, const Taps&) { return g[h * a.W + w]; }));
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
