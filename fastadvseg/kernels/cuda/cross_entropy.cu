// cross_entropy2d: per counted pixel, i.e. with a label y != ignore_index in [0, C) (anything else never counts
// and is never used as an index), with class weights w (1 without), eps = label_smoothing, lse = logsumexp_c(x),
// p = softmax(x) (PyTorch's F.cross_entropy(weight, ignore_index, label_smoothing) per pixel):
//   loss = (1 - eps) w_y (lse - x_y) + (eps/C) sum_c w_c (lse - x_c)
//   grad_c = (1 - eps) w_y (p_c - [c == y]) + (eps/C) (W p_c - w_c),   W = sum_c w_c (C without weights)
// (W is summed on the device, per pixel in the statistics pass: no host synchronisation).
// Raw sums: sums = [sum loss, sum w_y] (PyTorch's mean is their ratio); loss_map = the per-pixel losses (0 where
// uncounted). The gradient is that of the raw loss sum, exactly 0 at uncounted pixels (their logits are never
// read, so a NaN there never reaches the loss). eps = 0 is a separate instantiation with none of the smoothing
// arithmetic. Bad labels (neither ignore_index nor in [0, C)) are counted and the first in pixel order reported
// (bad = [count, value]; see launchers.cuh).
// Bytes moved (E = bytes per logit): reads the logits of counted pixels once from DRAM (E per element; the
// gradient sweep re-reads the pixel's C values from L1/L2) and 8 bytes of label per pixel; writes the gradient
// (E per element) when requested and 4 bytes per pixel for the loss map; plus 3 floats and 1 int64 per block of
// workspace.
// Upsampled (cross_entropy2d_upsampled_forward): the same per pixel of the label grid on logits interpolated from
// the low-resolution ones (4 reads per element, from L1/L2 after the first), 8 bytes of state per pixel written
// when a gradient is requested; then the gather (upsample.cu) reads that state about 4 times per pixel, mostly
// from L2, and writes the low-resolution gradient.
#include "pixel_ops.cuh"

namespace fastadvseg {
namespace cuda {
namespace {

template <typename T, bool kSmooth>
__global__ void __launch_bounds__(kThreads) cross_entropy_kernel(CrossEntropyArgs a, Workspace ws) {
  float acc[3] = {0.f, 0.f, 0.f};
  int64_t first_bad = kNoBad;
  FASTADVSEG_PIXEL_LOOP(p, a.s.N * a.s.H * a.s.W) cross_entropy_pixel<T, kSmooth>(a, p, acc, first_bad);
  block_sums_to_partials<3>(acc, ws.partials, ws.G);
  block_first_bad(first_bad, ws.first_bad);
}

template <typename T, bool kSmooth>
__global__ void __launch_bounds__(kThreads) cross_entropy_upsampled_kernel(CrossEntropyArgs a, Upsampled up,
                                                                           Workspace ws) {
  float acc[3] = {0.f, 0.f, 0.f};
  int64_t first_bad = kNoBad;
  FASTADVSEG_PIXEL_LOOP(p, a.s.N * a.s.H * a.s.W) cross_entropy_pixel<T, kSmooth>(a, p, acc, first_bad, up);
  block_sums_to_partials<3>(acc, ws.partials, ws.G);
  block_first_bad(first_bad, ws.first_bad);
}

}  // namespace

cudaError_t cross_entropy2d_forward(Shape4 s, int dtype, Strided4 x, Strided3 target, const float* weight,
                                    int64_t ignore_index, float label_smoothing, float* loss_map, Strided4 grad,
                                    void* workspace, float* sums, int64_t* bad, cudaStream_t stream) {
  const CrossEntropyArgs a{s, x, target, ignore_index, make_smoothing(label_smoothing, s.C, weight), loss_map, grad};
  const int64_t P = s.N * s.H * s.W;
  const Workspace ws = carve_workspace(workspace, P, true);
  const cudaError_t err = dispatch_logits(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (label_smoothing != 0.f) {
      cross_entropy_kernel<T, true><<<grid_of(ws.G), kThreads, 0, stream>>>(a, ws);
    } else {
      cross_entropy_kernel<T, false><<<grid_of(ws.G), kThreads, 0, stream>>>(a, ws);
    }
    return cudaGetLastError();
  });
  return then_finalize(err, ws, make_labelled_finalize(2, sums, bad, target, s.H, s.W), stream);
}

cudaError_t cross_entropy2d_upsampled_forward(Shape4 s, int dtype, Strided4 x, Upsample upsample, Strided3 target,
                                              const float* weight, int64_t ignore_index, float label_smoothing,
                                              float* loss_map, Strided4 grad, void* workspace, float* sums,
                                              int64_t* bad, cudaStream_t stream) {
  const Smoothing sm = make_smoothing(label_smoothing, s.C, weight);
  const CrossEntropyArgs a{s, x, target, ignore_index, sm, loss_map, Strided4{}};
  Upsampled up = make_upsampled(upsample, s.H, s.W);
  if (grad.data == nullptr) up.state = nullptr;
  const Workspace ws = carve_workspace(workspace, s.N * s.H * s.W, true);
  const bool smooth = label_smoothing != 0.f;
  cudaError_t err = dispatch_logits(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (smooth) {
      cross_entropy_upsampled_kernel<T, true><<<grid_of(ws.G), kThreads, 0, stream>>>(a, up, ws);
    } else {
      cross_entropy_upsampled_kernel<T, false><<<grid_of(ws.G), kThreads, 0, stream>>>(a, up, ws);
    }
    return cudaGetLastError();
  });
  err = then_finalize(err, ws, make_labelled_finalize(2, sums, bad, target, s.H, s.W), stream);
  if (err != cudaSuccess || grad.data == nullptr) return err;
  return launch_logit_grad(make_logit_grad(s, x, up, grad, sm), dtype, smooth, stream);
}

}  // namespace cuda
}  // namespace fastadvseg
