// Host-side interface of the CUDA kernels: plain C++ (no torch, no device code), included by the .cu files and
// by the torch binding in csrc/cuda/. Every launcher takes raw pointers, sizes and strides in elements, a dtype
// code and the stream to launch on, and returns the first failing launch's cudaError_t.
//
// Conventions shared by all ops:
//  * a "pixel" is (n, h, w); P = N*H*W pixels, one thread per pixel (grid-stride), adjacent threads take
//    adjacent pixels (coalesced in NCHW), each thread loops over the C channels with float32 accumulation;
//    the pixel index p = n*H*W + h*W + w is the "pixel order" (first bad label = smallest p);
//  * all index math is int64; strides may be anything (contiguous, channels_last, sliced, expanded);
//  * the losses return RAW sums, never means (the caller forms means and scales gradients): every block writes
//    its per-thread-accumulated float32 sums to the workspace (row k at partials[k * G + block]) and one finalize
//    block reduces each row in a fixed order in float64 and writes the K column sums as float32 to `sums`.
//    Deterministic: no atomics, and the grid (so the summation order) depends only on P;
//  * the labelled losses (cross_entropy2d, labelled generator_loss) also report bad labels (neither
//    ignore_index nor in [0, C)) without a host synchronisation: bad[0] = how many, bad[1] = the int64 value of
//    the first in pixel order (0 when none). Such pixels do not count. Their workspace holds one more float row
//    (the per-block bad count) and G int64 per-block smallest bad pixel indices (see workspace_bytes);
//  * a gradient buffer, when given, receives d(raw sum)/d(input) for every element (exactly 0 where the pixel does
//    not count: a select, so NaN/Inf inputs there never reach it);
//  * the *_upsampled launchers and the two map launchers at the end fuse bilinear upsampling into the ops (see
//    there): inputs at a lower resolution than the labels, gradients at the inputs' resolution.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace fastadvseg {
namespace cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

constexpr int kThreads = 256;     // threads per block of every pixel kernel (the block reduction relies on it)
constexpr int64_t kMaxBlocks = 2048;  // grid cap: the grid (and so the summation order) depends only on P

// Blocks of a pixel kernel over `pixels` pixels; also the row length G of its partial-sum workspace.
inline int64_t grid_blocks(int64_t pixels) {
  int64_t b = (pixels + kThreads - 1) / kThreads;
  return b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b);
}

// Bytes of the workspace of a loss over `pixels` pixels with K sums: G int64 per-block first-bad-pixel indices
// (labelled ops only; 8-byte aligned at its start) followed by K (+1 bad-count row when labelled) rows of G floats.
inline int64_t workspace_bytes(int64_t pixels, int K, bool labelled) {
  const int64_t G = grid_blocks(pixels);
  return labelled ? G * 8 + (K + 1) * G * 4 : K * G * 4;
}

struct Shape4 {
  int64_t N, C, H, W;
};

// A 4-D (N, C, H, W) tensor: data pointer (with its storage offset applied) and strides in elements.
struct Strided4 {
  void* data;
  int64_t sn, sc, sh, sw;
};

// A 3-D (N, H, W) map. data == nullptr means "absent". dtype is a DType for float maps; it is ignored for
// label maps (always int64) and masks (bool, one byte, nonzero = ignored).
struct Strided3 {
  void* data;
  int64_t sn, sh, sw;
  int dtype;
};

// softmax2d: y = softmax_c(x); dtype = DType of x, y (float32/float16/bfloat16).
cudaError_t softmax2d_forward(Shape4 s, int dtype, Strided4 x, Strided4 y, cudaStream_t stream);
// From the saved probabilities p = softmax(x): gx = p * (gy - sum_c p*gy) in float32 math (no recomputation from
// the logits); p, gy, gx of the same dtype.
cudaError_t softmax2d_backward(Shape4 s, int dtype, Strided4 p, Strided4 gy, Strided4 gx, cudaStream_t stream);

// cross_entropy2d with PyTorch's label smoothing eps (0: none) and class weights (C float32 values or nullptr).
// sums: 2 floats = [sum of the per-pixel losses, sum of w_y over counted pixels]; bad: 2 int64 (see above).
// loss_map (P floats, contiguous) is written when non-null; grad.data may be nullptr (no gradient).
// workspace: workspace_bytes(P, 2, true) bytes.
cudaError_t cross_entropy2d_forward(Shape4 s, int dtype, Strided4 x, Strided3 target, const float* weight,
                                    int64_t ignore_index, float label_smoothing, float* loss_map, Strided4 grad,
                                    void* workspace, float* sums, int64_t* bad, cudaStream_t stream);

// bce_with_logits2d on one (N, H, W) map z (any float DType): target is a map (target.data) or the scalar
// target_value; mask optional. grad has z's dtype. sums: 2 floats = [loss sum, counted pixels].
// workspace: workspace_bytes(P, 4, false) bytes (the kernel is the discriminator's, with an empty second map).
cudaError_t bce_with_logits2d_forward(int64_t N, int64_t H, int64_t W, Strided3 z, Strided3 target,
                                      float target_value, Strided3 mask, float* loss_map, Strided3 grad,
                                      void* workspace, float* sums, cudaStream_t stream);

// discriminator_loss: BCE(fake, 0) and BCE(real, 1) over non-ignored pixels, in one launch.
// fake_nhw / real_nhw are {N, H, W}. sums: 4 floats = [fake sum, fake count, real sum, real count].
// workspace: workspace_bytes(P_fake + P_real, 4, false) bytes.
cudaError_t discriminator_loss_forward(const int64_t* fake_nhw, Strided3 fake, Strided3 fake_mask, Strided3 fake_grad,
                                       const int64_t* real_nhw, Strided3 real, Strided3 real_mask, Strided3 real_grad,
                                       void* workspace, float* sums, cudaStream_t stream);

// semi_cross_entropy2d: pseudo-label argmax_c x, kept where sigmoid(float(z)) > threshold and not masked, decided
// exactly as float(z) > logit(threshold) (keep_logit_of in pixel_ops.cuh, once per call; fastadvseg/_keep.py).
// sums: 3 floats = [loss sum over kept pixels, kept, considered (not masked)].
// workspace: workspace_bytes(P, 3, false) bytes.
cudaError_t semi_cross_entropy2d_forward(Shape4 s, int dtype, Strided4 x, Strided3 z, float threshold,
                                         Strided3 mask, float* loss_map, Strided4 grad, void* workspace, float* sums,
                                         cudaStream_t stream);

// generator_loss: labelled when target.data != nullptr. sums: 6 floats =
//   [term sum, term count, adv sum, adv count, kept, considered]
// labelled: term = cross-entropy over counted pixels, adv over the same pixels, kept = considered = 0;
// unlabelled: term = L_semi over kept pixels (the keep rule of semi_cross_entropy2d; term count = kept), adv over
// all P pixels, considered = P.
// grad_x (x's dtype, may be absent) gets d(term sum)/dx; grad_z (z's dtype, may be absent) gets d(adv sum)/dz.
// bad: 2 int64 (labelled; [0, 0] when unlabelled). workspace: workspace_bytes(P, 6, true) bytes.
cudaError_t generator_loss_forward(Shape4 s, int dtype, Strided4 x, Strided3 z, Strided3 target,
                                   int64_t ignore_index, float threshold, Strided4 grad_x, Strided3 grad_z,
                                   void* workspace, float* sums, int64_t* bad, cudaStream_t stream);

// ------------------------------------------------------------------------------------ fused bilinear upsampling
// An op on logits x (N, C, h, w) and a label grid (H, W) of another size is the op applied to
// F.interpolate(x.float(), (H, W), mode="bilinear", align_corners): labels, masks, D maps and loss maps are at
// (H, W), sums and counts are over the H*W pixels, and the gradient has x's shape and dtype (the adjoint of the
// interpolation applied to the gradient at (H, W)). Neither the upsampled logits nor their gradient at (H, W) is
// ever stored: the loss kernel interpolates each pixel's logits from the four pixels around it (in float32, never
// rounded to x's dtype) and keeps kLogitStateBytes per label-grid pixel (log-sum-exp and counted class) in
// `scratch`; a second kernel gathers each gradient element from the pixels it feeds, in a fixed order (no
// atomics: deterministic). Weights: PyTorch's (taps_at in common.cuh). s is {N, C, H, W}, the label grid.
// A D map of another size than the labels is upsampled to a float32 (N, H, W) map first (upsample_map) and fed
// to the launchers above as such; the float32 (N, H, W) gradient they write for it is reduced to the map's own
// resolution and dtype by map_grad_gather.

// The logits' grid, the resampling and the gather's scratch (kLogitStateBytes per label-grid pixel, 8-byte
// aligned; may be nullptr when no gradient is requested).
struct Upsample {
  int64_t h, w;
  bool align_corners;
  void* scratch;
};
constexpr int64_t kLogitStateBytes = 8;

// softmax2d of the upsampled logits: y (N, C, H, W) in x's dtype.
cudaError_t softmax2d_upsampled_forward(Shape4 s, int dtype, Strided4 x, Upsample up, Strided4 y,
                                        cudaStream_t stream);
// Its gradient at the logits' resolution: gx (N, C, up.h, up.w) from the saved probabilities p and their gradient gy
// at s's grid (p, gy, gx of one dtype). up.scratch: N*H*W floats (sum_c p*gy per pixel).
cudaError_t softmax2d_upsampled_backward(Shape4 s, int dtype, Strided4 p, Strided4 gy, Upsample up, Strided4 gx,
                                         cudaStream_t stream);

// As cross_entropy2d_forward, with x upsampled; grad (N, C, up.h, up.w).
cudaError_t cross_entropy2d_upsampled_forward(Shape4 s, int dtype, Strided4 x, Upsample up, Strided3 target,
                                              const float* weight, int64_t ignore_index, float label_smoothing,
                                              float* loss_map, Strided4 grad, void* workspace, float* sums,
                                              int64_t* bad, cudaStream_t stream);

// As semi_cross_entropy2d_forward, with x upsampled (z and mask at (H, W)); grad (N, C, up.h, up.w).
cudaError_t semi_cross_entropy2d_upsampled_forward(Shape4 s, int dtype, Strided4 x, Upsample up, Strided3 z,
                                                   float threshold, Strided3 mask, float* loss_map, Strided4 grad,
                                                   void* workspace, float* sums, cudaStream_t stream);

// As generator_loss_forward, with x upsampled (z, target and grad_z at (H, W)); grad_x (N, C, up.h, up.w).
cudaError_t generator_loss_upsampled_forward(Shape4 s, int dtype, Strided4 x, Upsample up, Strided3 z,
                                             Strided3 target, int64_t ignore_index, float threshold, Strided4 grad_x,
                                             Strided3 grad_z, void* workspace, float* sums, int64_t* bad,
                                             cudaStream_t stream);

// pseudo_label_cross_entropy2d: the student's -log softmax(x)[y] with y = argmax_c of the teacher's logits (x's
// own when teacher.data is nullptr: x is then read once for both), kept where not masked, where the teacher's
// max softmax >= confidence_threshold (when test_confidence) and where sigmoid(float(z)) > d_threshold (when
// z.data is not nullptr; the keep rule of semi_cross_entropy2d_forward). The teacher has x's dtype, N and C.
// x and the teacher are each at the label grid s (x_up / teacher_up (h, w) == (H, W): read in place) or
// upsampled to it from their own grid (h, w) (see above); z and mask are at (H, W). grad has x's shape; when x is
// upsampled, x_up.scratch holds kLogitStateBytes per label-grid pixel (nullptr without a gradient).
// sums: 3 floats = [loss sum over kept pixels, kept, considered (not masked)].
// workspace: workspace_bytes(P, 3, false) bytes.
cudaError_t pseudo_label_cross_entropy2d_forward(Shape4 s, int dtype, Strided4 x, Upsample x_up, Strided4 teacher,
                                                 Upsample teacher_up, Strided3 z, float d_threshold,
                                                 bool test_confidence, float confidence_threshold, Strided3 mask,
                                                 float* loss_map, Strided4 grad, void* workspace, float* sums,
                                                 cudaStream_t stream);

// A map z (N, h, w) of any float DType upsampled to out, a contiguous float32 (N, H, W) map.
cudaError_t upsample_map(int64_t N, int64_t h, int64_t w, Strided3 z, int64_t H, int64_t W, bool align_corners,
                         float* out, cudaStream_t stream);
// The gradient g (contiguous float32 (N, H, W)) of such an upsampled map, at the map's resolution: out (N, h, w),
// any float DType.
cudaError_t map_grad_gather(int64_t N, int64_t H, int64_t W, const float* g, int64_t h, int64_t w,
                            bool align_corners, Strided3 out, cudaStream_t stream);

// one_hot2d: out is a contiguous (N, C, H, W) tensor of elements of elem_size bytes (1, 2, 4 or 8);
// one_bits is the bit pattern of the value 1 in that dtype (zero is all-zero bits).
cudaError_t one_hot2d_forward(Shape4 s, Strided3 target, int64_t ignore_index, void* out, int elem_size,
                              uint64_t one_bits, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastadvseg
