// The cpu backend's kernels: plain C++ over raw pointers, sizes and strides (in elements), OpenMP over pixels.
//
// bindings.cpp receives the tensors from fastadvseg/backends/cpu.py, checks them and passes their pointers, sizes
// and strides; the tensors stay referenced by the call until the kernel returns.
// Every reduction is deterministic and independent of the thread count: pixels are cut into fixed blocks that
// depend on the shape only, each block sums in double, and the block sums are added in block order.
#pragma once

#include <cstdint>
#include <vector>

namespace fas {

// A (N, C, H, W) tensor: data pointer, dtype code (dtypes.h) and strides in elements.
struct Tensor4 {
  void* ptr = nullptr;
  int dtype = 0;
  int64_t sN = 0, sC = 0, sH = 0, sW = 0;
};

// An (N, H, W) map of a fixed element type (int64 labels, float32 maps, bool masks): pointer and strides.
struct Map3 {
  const void* ptr = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0;
  template <class E>
  inline E at(int64_t n, int64_t h, int64_t w) const {
    return static_cast<const E*>(ptr)[n * s0 + h * s1 + w * s2];
  }
};

// One axis of a bilinear resize, PyTorch's upsample_bilinear2d (F.interpolate(x, size, mode="bilinear",
// align_corners)) from `in` to `out` points: output d is x[i0[d]] l0[d] + x[i1[d]] l1[d]. first[i] .. last[i] are
// the outputs that read input i (first > last: none; contiguous, because i0 and i1 never decrease).
struct ResizeAxis {
  int64_t in = 0, out = 0;
  std::vector<int64_t> i0, i1, first, last;
  std::vector<float> l0, l1;
};

// The tables of one axis, computed as PyTorch's CPU kernel does (kernels.cpp). in, out >= 1.
ResizeAxis resize_axis(int64_t in, int64_t out, bool align_corners);

// The fused one-pass loss over logits (cross-entropy, L_semi and the pseudo-label loss, the generator loss).
//
// Resizing: the per-pixel maps (labels, mask, loss_map) are at (H, W). The logits (and their gradient) may be at
// (xH, xW), the teacher's logits at (tH, tW) and the discriminator map z (and grad_z) at (zH, zW): each is then
// bilinearly resized to (H, W) on the fly (ResizeAxis), and its gradient is the adjoint of that resize applied to
// the full-resolution gradient, i.e. the gradient of the loss sum w.r.t. the low-resolution tensor. 0 means
// (H, W): no resize.
struct FusedArgs {
  int64_t N = 0, C = 0, H = 0, W = 0;
  Tensor4 x;                 // logits (read once)
  Tensor4 grad;              // gradient output (same dtype as x), ptr == nullptr: no gradient wanted
  float grad_scale = 1.f;    // grad = grad_scale * d(weighted sum of nll)/dx
  int label_mode = 0;        // 0: labels from `labels`; 1: pseudo-label argmax_c of the teacher (first max)
  Tensor4 teacher;           // label_mode 1: the teacher's logits (x's dtype, N and C), ptr == nullptr: x itself
                             //   (self-training: the logits are read once for both)
  Map3 labels;               // int64; labels outside [0, C) or == ignore_index are not counted
  int64_t ignore_index = 255;
  const float* weight = nullptr;  // optional class weights (C,), float32
  float label_smoothing = 0.f;    // label_mode 0 only: PyTorch's cross_entropy(..., label_smoothing=eps), see below
  Map3 z;                    // float32 discriminator logits (keep mask and adversarial term)
  Map3 mask;                 // bool ignore mask (keep_mode only), ptr == nullptr: none
  int keep_mode = 0;         // 1: count pixel iff not masked, sigmoid(z) > threshold where z is given (decided as
  float threshold = 0.f;     //    z > logit(threshold) exactly: keep_logit in kernels_impl.h, fastadvseg/_keep.py)
  bool confidence_test = false;   // and (label_mode 1) the teacher's max softmax 1 / sum_c exp(t_c - max_c t),
  float confidence = 0.f;         // in float32, >= confidence (a NaN teacher pixel is never kept); not maps_only
  int adv_mode = 0;          // 0: none; 1: BCE(z, 1) over pixels with a valid label; 2: over all pixels
  float* loss_map = nullptr;  // optional (N, H, W) contiguous float32 per-pixel loss (0 where not counted)
  float* grad_z = nullptr;   // optional (N, H, W) contiguous float32 gradient of the adversarial sum
  float grad_z_scale = 1.f;
  bool maps_only = false;    // only read the maps (counts for the gradient scale); do not touch the logits
  int num_threads = 1;
  int64_t xH = 0, xW = 0;    // the logits' spatial size, 0: (H, W)
  int64_t zH = 0, zW = 0;    // z's spatial size, 0: (H, W)
  int64_t tH = 0, tW = 0;    // the teacher's spatial size, 0: (H, W)
  bool align_corners = false;
};

// Label smoothing (eps = label_smoothing, label_mode 0): a counted pixel's loss is PyTorch's
//   (1 - eps) w_y (lse - x_y) + (eps / C) sum_c w_c (lse - x_c),   lse = logsumexp_c x, w_c = 1 without weights,
// and its gradient grad_scale [(1 - eps) w_y (p_c - [c == y]) + (eps / C) (W p_c - w_c)], W = sum_c w_c. The
// weight sum stays the sum of w_y (PyTorch's mean divides the smoothed sum by it). eps == 0 runs the kernel
// without the smoothing terms at all (bit-identical to a call without it).

// Sums returned by fused_loss, in this order; then kBadLabels (labels outside [0, C) that are not ignore_index,
// which every pass with labels counts, maps_only included) and kFirstBad (the flat (N, H, W) index of the first
// such pixel, -1 if none): the label check of the public functions, without a pass of its own.
enum FusedSum { kLossSum = 0, kWeightSum, kAdvSum, kAdvCount, kKept, kConsidered, kBadLabels, kFirstBad, kNumSums };

std::vector<double> fused_loss(const FusedArgs& a);

void softmax_forward(int64_t N, int64_t C, int64_t H, int64_t W, const Tensor4& x, const Tensor4& y,
                     int num_threads);
void softmax_backward(int64_t N, int64_t C, int64_t H, int64_t W, const Tensor4& y, const Tensor4& gy,
                      const Tensor4& gx, int num_threads);

// softmax2d of logits x (N, C, h, w) resized to (H, W): y is (N, C, H, W). The logits are never materialised at
// (H, W) beyond a block.
void softmax_forward_resized(int64_t N, int64_t C, int64_t H, int64_t W, int64_t h, int64_t w, bool align_corners,
                             const Tensor4& x, const Tensor4& y, int num_threads);
// Its backward: y and gy at (N, C, H, W), gx at (N, C, h, w) the gradient w.r.t. the low-resolution logits.
void softmax_backward_resized(int64_t N, int64_t C, int64_t H, int64_t W, int64_t h, int64_t w, bool align_corners,
                              const Tensor4& y, const Tensor4& gy, const Tensor4& gx, int num_threads);

// out: contiguous (N, C, H, W) of elem_size bytes; `one` is the bit pattern of 1 in that dtype.
void one_hot(int64_t N, int64_t C, int64_t H, int64_t W, const Map3& labels, int64_t ignore_index, void* out,
             int elem_size, uint64_t one, int num_threads);

// Labels (int64 (N, H, W) map) outside [0, C) that are not ignore_index: {how many, the first one in pixel
// order (0 if none)}. The argument check of the public functions, in one pass.
std::vector<int64_t> find_bad_labels(int64_t N, int64_t H, int64_t W, const Map3& labels, int64_t C,
                                     int64_t ignore_index, int num_threads);

// BCE with logits over one float32 map: loss = (1 - t) z - log_sigmoid(z), grad = grad_scale (sigmoid(z) - t).
// z may be at (zH, zW) and is then bilinearly resized to (H, W), the size of the target, mask and loss map; grad is
// then at z's size (the adjoint of the resize applied to the full-resolution gradient).
struct BceArgs {
  int64_t N = 0, H = 0, W = 0;
  int64_t zH = 0, zW = 0;  // z's spatial size, 0: (H, W)
  bool align_corners = false;
  Map3 z;             // float32
  Map3 target;        // float32 map, or ptr == nullptr: the constant target_value
  float target_value = 0.f;
  Map3 mask;          // bool, True = not counted
  float* loss_map = nullptr;  // optional contiguous (N, H, W)
  float* grad = nullptr;      // optional contiguous (N, H, W) (or (N, zH, zW)), 0 where not counted
  float grad_scale = 1.f;     // grad = grad_scale * (sigmoid(z) - t)
};

// Returns {loss sum, count} for each map.
std::vector<double> bce_maps(const std::vector<BceArgs>& maps, int num_threads);

// The kernel build in use: "avx512", "avx2" or "base" (kernels.cpp).
const char* isa();

// Float32 outputs of this many bytes or more are written with streaming stores (kernels_impl.h, StreamRows):
// by default max(8 MiB, half the L3 cache one core sees), i.e. when an output and its input cannot both stay in it.
// set_stream_bytes overrides it for the process (tests force either path); 0 restores the default.
int64_t stream_bytes();
void set_stream_bytes(int64_t bytes);
int64_t default_stream_bytes();
// The L3 size one core sees, in bytes (sysfs, else sysconf; 0 if unknown), and the parser of sysfs' "32768K".
int64_t l3_cache_bytes();
int64_t parse_cache_size(const char* text);

}  // namespace fas
