// Host-side interface of the CUDA kernels: plain C++ (no torch, no device code), included by the .cu files and
// by the torch binding in csrc/cuda/. Every launcher takes raw pointers, sizes and strides in elements, a dtype
// code and the stream to launch on, and returns the launch's cudaError_t.
//
// Conventions shared by all ops:
//  * a "pixel" is (n, h, w); P = N*H*W pixels, one thread per pixel (grid-stride), adjacent threads take
//    adjacent pixels (coalesced in NCHW), each thread loops over the C channels with float32 accumulation;
//  * all index math is int64; strides may be anything (contiguous, channels_last, sliced, expanded);
//  * reductions are deterministic: every block writes its K partial sums to partials[k * G + block] and one
//    finalize block reduces them in a fixed order (in float64), then applies the op's epilogue (means, totals);
//  * a gradient buffer, when given, receives d(unnormalised sum)/d(input) for every element (zeros where the
//    pixel does not count); the caller scales it by grad_output / count in backward.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace fastadvseg {
namespace cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
enum Reduction : int { kReduceNone = 0, kReduceMean = 1, kReduceSum = 2 };

constexpr int kThreads = 256;     // threads per block of every pixel kernel (the block reduction relies on it)
constexpr int64_t kMaxBlocks = 2048;  // grid cap: the grid (and so the summation order) depends only on P
constexpr int kMaxOutputs = 8;

// Blocks of a pixel kernel over `pixels` pixels; also the row length G of its partial-sum buffer.
inline int64_t grid_blocks(int64_t pixels) {
  int64_t b = (pixels + kThreads - 1) / kThreads;
  return b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b);
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

// Scalar outputs (float32, device pointers; nullptr entries are not written).
struct Outputs {
  float* p[kMaxOutputs];
};

// softmax2d: y = softmax_c(x); dtype = DType of x, y (float32/float16/bfloat16).
cudaError_t softmax2d_forward(Shape4 s, int dtype, Strided4 x, Strided4 y, cudaStream_t stream);
// gx = p * (gy - sum_c p*gy), p = softmax(x) recomputed in float32; x, gy, gx of the same dtype.
cudaError_t softmax2d_backward(Shape4 s, int dtype, Strided4 x, Strided4 gy, Strided4 gx, cudaStream_t stream);

// cross_entropy2d. partials: 2*G floats. out.p[0] = loss (mean or sum), out.p[1] = its denominator
// (sum of weights over valid pixels, or 1 if that is <= 0; 1 for "sum"). loss_map (P floats, contiguous) is
// written when non-null. weight: C float32 values or nullptr. grad.data may be nullptr (no gradient).
cudaError_t cross_entropy2d_forward(Shape4 s, int dtype, Strided4 x, Strided3 target, const float* weight,
                                    int64_t ignore_index, int reduction, float* loss_map, Strided4 grad,
                                    float* partials, Outputs out, cudaStream_t stream);

// bce_with_logits2d on one (N, H, W) map z (any float DType): target is a map (target.data) or the scalar
// target_value; mask optional. grad has z's dtype. partials: 4*G floats. out.p[0] = loss, out.p[1] = denominator.
cudaError_t bce_with_logits2d_forward(int64_t N, int64_t H, int64_t W, Strided3 z, Strided3 target,
                                      float target_value, Strided3 mask, int reduction, float* loss_map,
                                      Strided3 grad, float* partials, Outputs out, cudaStream_t stream);

// discriminator_loss: BCE(fake, 0) + BCE(real, 1), each a mean over non-ignored pixels, in one launch.
// fake_nhw / real_nhw are {N, H, W}. partials: 4*G floats with G = grid_blocks(P_fake + P_real).
// out.p[0] = loss, out.p[1] = fake denominator, out.p[2] = real denominator.
cudaError_t discriminator_loss_forward(const int64_t* fake_nhw, Strided3 fake, Strided3 fake_mask, Strided3 fake_grad,
                                       const int64_t* real_nhw, Strided3 real, Strided3 real_mask, Strided3 real_grad,
                                       float* partials, Outputs out, cudaStream_t stream);

// semi_cross_entropy2d: pseudo-label argmax_c x, kept where sigmoid(float(z)) > threshold and not masked.
// partials: 3*G floats. out.p[0] = loss, out.p[1] = denominator, out.p[2] = kept / max(considered, 1).
cudaError_t semi_cross_entropy2d_forward(Shape4 s, int dtype, Strided4 x, Strided3 z, float threshold,
                                         Strided3 mask, int reduction, float* loss_map, Strided4 grad,
                                         float* partials, Outputs out, cudaStream_t stream);

// generator_loss: labelled when target.data != nullptr. partials: 6*G floats.
// out.p[0..7] = total, ce, adv, semi, semi_ratio, den_ce, den_adv, den_semi.
// grad_x (x's dtype, may be absent) gets d(ce_sum)/dx (labelled) or d(semi_sum)/dx (unlabelled);
// grad_z (z's dtype, may be absent) gets d(adv_sum)/dz.
cudaError_t generator_loss_forward(Shape4 s, int dtype, Strided4 x, Strided3 z, Strided3 target,
                                   int64_t ignore_index, double lambda_adv, double lambda_semi, float threshold,
                                   Strided4 grad_x, Strided3 grad_z, float* partials, Outputs out,
                                   cudaStream_t stream);

// one_hot2d: out is a contiguous (N, C, H, W) tensor of elements of elem_size bytes (1, 2, 4 or 8);
// one_bits is the bit pattern of the value 1 in that dtype (zero is all-zero bits).
cudaError_t one_hot2d_forward(Shape4 s, Strided3 target, int64_t ignore_index, void* out, int elem_size,
                              uint64_t one_bits, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastadvseg
