// bce_with_logits2d and discriminator_loss (two maps, one launch).
// Per counted pixel (not ignore-masked): loss = (1 - t)*z + softplus(-z) (PyTorch's form, stable),
// d loss / dz = sigmoid(z) - t. Masked pixels give 0 loss and exactly 0 gradient (a NaN there never reaches the sum).
// Raw sums: bce: sums = [sum loss, counted pixels] (+ the per-pixel map when requested);
// discriminator: sums = [fake sum, fake count, real sum, real count] of BCE(fake, 0) and BCE(real, 1); the two
// maps may have different shapes: the grid walks the fake pixels, then the real ones.
// Map dtypes (logits, targets, gradients) are runtime codes (float32/float16/bfloat16/float64), math in float32.
// Bytes moved per pixel (E = bytes per map element): read z (E), target map if any, mask (1) if any;
// write the gradient (E) when requested and 4 bytes for the loss map; 4 floats per block of workspace.
// No logits-sized tensor is involved.
#include "pixel_ops.cuh"

namespace fastadvseg {
namespace cuda {
namespace {

__global__ void __launch_bounds__(kThreads) bce_kernel(BceSegment first, BceSegment second, Workspace ws) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  FASTADVSEG_PIXEL_LOOP(q, first.P + second.P) bce_pair_pixel(first, second, q, acc);
  block_sums_to_partials<4>(acc, ws.partials, ws.G);
}

// The two segments' kernel, then the finalize of their first K sums.
cudaError_t launch(const BceSegment& first, const BceSegment& second, void* workspace, int K, float* sums,
                   cudaStream_t stream) {
  const Workspace ws = carve_workspace(workspace, first.P + second.P, false);
  bce_kernel<<<grid_of(ws.G), kThreads, 0, stream>>>(first, second, ws);
  return then_finalize(cudaGetLastError(), ws, make_finalize(K, sums), stream);
}

}  // namespace

cudaError_t bce_with_logits2d_forward(int64_t N, int64_t H, int64_t W, Strided3 z, Strided3 target,
                                      float target_value, Strided3 mask, float* loss_map, Strided3 grad,
                                      void* workspace, float* sums, cudaStream_t stream) {
  const BceSegment first{H, W, N * H * W, z, target, mask, grad, target_value, loss_map};
  const BceSegment none{1, 1, 0, Strided3{}, Strided3{}, Strided3{}, Strided3{}, 0.f, nullptr};
  // rows 0, 1 of the 4: the first segment's sum and count
  return launch(first, none, workspace, 2, sums, stream);
}

cudaError_t discriminator_loss_forward(const int64_t* fake_nhw, Strided3 fake, Strided3 fake_mask, Strided3 fake_grad,
                                       const int64_t* real_nhw, Strided3 real, Strided3 real_mask, Strided3 real_grad,
                                       void* workspace, float* sums, cudaStream_t stream) {
  const BceSegment first{fake_nhw[1], fake_nhw[2], fake_nhw[0] * fake_nhw[1] * fake_nhw[2], fake, Strided3{},
                         fake_mask, fake_grad, 0.f, nullptr};
  const BceSegment second{real_nhw[1], real_nhw[2], real_nhw[0] * real_nhw[1] * real_nhw[2], real, Strided3{},
                          real_mask, real_grad, 1.f, nullptr};
  return launch(first, second, workspace, 4, sums, stream);
}

}  // namespace cuda
}  // namespace fastadvseg
