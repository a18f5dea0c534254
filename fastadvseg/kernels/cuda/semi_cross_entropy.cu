// semi_cross_entropy2d (L_semi): per pixel not ignore-masked ("considered"), keep = sigmoid(float32(z)) > T, decided
// exactly as float32(z) > logit(T) (keep_logit_of / keep_pixel in pixel_ops.cuh: the constant once per call);
// at kept pixels the pseudo-label is yhat = argmax_c x (first maximum on ties) and
// nll = logsumexp_c(x) - x_yhat. Raw sums: sums = [sum nll over kept pixels, kept, considered] (+ the per-pixel
// map, 0 where not kept, when requested).
// Gradient of the raw sum (to the logits only; z and yhat are constants): softmax(x)_c - [c == yhat] at kept
// pixels, exactly 0 elsewhere; the logits of pixels that are not kept are never read.
// Bytes moved (E = bytes per logit, Ez per map element): reads the logits of kept pixels once from DRAM
// (E per element), z (Ez per pixel) and the mask (1 byte per pixel) if any; writes the gradient (E per element)
// when requested, 4 bytes per pixel for the loss map, 3 floats per block of workspace.
// Upsampled (semi_cross_entropy2d_upsampled_forward): the same per label-grid pixel on interpolated logits, with
// 8 bytes of state per pixel for the gather of the low-resolution gradient (see cross_entropy.cu).
#include "pixel_ops.cuh"

namespace fastadvseg {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) semi_kernel(SemiArgs a, Workspace ws) {
  float acc[3] = {0.f, 0.f, 0.f};
  FASTADVSEG_PIXEL_LOOP(p, a.s.N * a.s.H * a.s.W) semi_pixel<T>(a, p, acc);
  block_sums_to_partials<3>(acc, ws.partials, ws.G);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) semi_upsampled_kernel(SemiArgs a, Upsampled up, Workspace ws) {
  float acc[3] = {0.f, 0.f, 0.f};
  FASTADVSEG_PIXEL_LOOP(p, a.s.N * a.s.H * a.s.W) semi_pixel<T>(a, p, acc, up);
  block_sums_to_partials<3>(acc, ws.partials, ws.G);
}

}  // namespace

cudaError_t semi_cross_entropy2d_forward(Shape4 s, int dtype, Strided4 x, Strided3 z, float threshold,
                                         Strided3 mask, float* loss_map, Strided4 grad, void* workspace, float* sums,
                                         cudaStream_t stream) {
  const SemiArgs a{s, x, z, mask, threshold, loss_map, grad};
  const Workspace ws = carve_workspace(workspace, s.N * s.H * s.W, false);
  const cudaError_t err = dispatch_logits(dtype, [&](auto tag) {
    semi_kernel<decltype(tag)><<<grid_of(ws.G), kThreads, 0, stream>>>(a, ws);
    return cudaGetLastError();
  });
  return then_finalize(err, ws, make_finalize(3, sums), stream);
}

cudaError_t semi_cross_entropy2d_upsampled_forward(Shape4 s, int dtype, Strided4 x, Upsample upsample, Strided3 z,
                                                   float threshold, Strided3 mask, float* loss_map, Strided4 grad,
                                                   void* workspace, float* sums, cudaStream_t stream) {
  const SemiArgs a{s, x, z, mask, threshold, loss_map, Strided4{}};
  Upsampled up = make_upsampled(upsample, s.H, s.W);
  if (grad.data == nullptr) up.state = nullptr;
  const Workspace ws = carve_workspace(workspace, s.N * s.H * s.W, false);
  cudaError_t err = dispatch_logits(dtype, [&](auto tag) {
    semi_upsampled_kernel<decltype(tag)><<<grid_of(ws.G), kThreads, 0, stream>>>(a, up, ws);
    return cudaGetLastError();
  });
  err = then_finalize(err, ws, make_finalize(3, sums), stream);
  if (err != cudaSuccess || grad.data == nullptr) return err;
  return launch_logit_grad(make_logit_grad(s, x, up, grad, no_smoothing()), dtype, false, stream);
}

}  // namespace cuda
}  // namespace fastadvseg
