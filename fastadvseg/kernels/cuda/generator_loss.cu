// generator_loss: the generator's loss terms as raw sums in one pass over the logits x (N, C, H, W) and the
// discriminator logits z (N, H, W); the caller forms the means and combines the terms (no lambdas here).
//  labelled (target given), at counted pixels (label y != ignore_index in [0, C)):
//     term += logsumexp(x) - x_y, term count += 1     Gx = softmax(x) - onehot(y)
//     adv  += BCE(z, 1) = softplus(-z), adv count += 1 Gz = sigmoid(z) - 1
//     kept = considered = 0; bad labels (neither ignore_index nor in [0, C)) are counted, the first reported
//  unlabelled, at every pixel: adv += BCE(z, 1), Gz = sigmoid(z) - 1, considered += 1; where sigmoid(z) > T
//     (decided as z > logit(T): keep_logit_of / keep_pixel in pixel_ops.cuh)
//     (kept) with yhat = argmax_c x: term += logsumexp(x) - x_yhat, term count += 1, kept += 1,
//     Gx = softmax(x) - onehot(yhat); bad = [0, 0]
// sums = [term, term count, adv, adv count, kept, considered]. Gx = d(term)/dx and Gz = d(adv)/dz, exactly 0
// where a pixel does not count (its logits are never read).
// Bytes moved (E = bytes per logit, Ez per z element): reads the logits once from DRAM (E per element, only at
// counted pixels), the label (8 bytes per pixel) and z (Ez per pixel); writes Gx (E per element) and Gz (Ez per
// pixel) when requested, plus 7 floats and 1 int64 per block of workspace.
// Upsampled (generator_loss_upsampled_forward): the same per label-grid pixel on interpolated logits, with 8 bytes
// of state per pixel for the gather of the low-resolution Gx (see cross_entropy.cu); z, the labels and Gz at the
// label grid.
#include "pixel_ops.cuh"

namespace fastadvseg {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) generator_kernel(GeneratorArgs a, Workspace ws) {
  float acc[7] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t first_bad = kNoBad;
  FASTADVSEG_PIXEL_LOOP(p, a.s.N * a.s.H * a.s.W) generator_pixel<T>(a, p, acc, first_bad);
  block_sums_to_partials<7>(acc, ws.partials, ws.G);
  block_first_bad(first_bad, ws.first_bad);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) generator_upsampled_kernel(GeneratorArgs a, Upsampled up, Workspace ws) {
  float acc[7] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t first_bad = kNoBad;
  FASTADVSEG_PIXEL_LOOP(p, a.s.N * a.s.H * a.s.W) generator_pixel<T>(a, p, acc, first_bad, up);
  block_sums_to_partials<7>(acc, ws.partials, ws.G);
  block_first_bad(first_bad, ws.first_bad);
}

}  // namespace

cudaError_t generator_loss_forward(Shape4 s, int dtype, Strided4 x, Strided3 z, Strided3 target,
                                   int64_t ignore_index, float threshold, Strided4 grad_x, Strided3 grad_z,
                                   void* workspace, float* sums, int64_t* bad, cudaStream_t stream) {
  const GeneratorArgs a{s, x, z, target, ignore_index, threshold, grad_x, grad_z};
  const Workspace ws = carve_workspace(workspace, s.N * s.H * s.W, true);
  const cudaError_t err = dispatch_logits(dtype, [&](auto tag) {
    generator_kernel<decltype(tag)><<<grid_of(ws.G), kThreads, 0, stream>>>(a, ws);
    return cudaGetLastError();
  });
  return then_finalize(err, ws, make_labelled_finalize(6, sums, bad, target, s.H, s.W), stream);
}

cudaError_t generator_loss_upsampled_forward(Shape4 s, int dtype, Strided4 x, Upsample upsample, Strided3 z,
                                             Strided3 target, int64_t ignore_index, float threshold, Strided4 grad_x,
                                             Strided3 grad_z, void* workspace, float* sums, int64_t* bad,
                                             cudaStream_t stream) {
  const GeneratorArgs a{s, x, z, target, ignore_index, threshold, Strided4{}, grad_z};
  Upsampled up = make_upsampled(upsample, s.H, s.W);
  if (grad_x.data == nullptr) up.state = nullptr;
  const Workspace ws = carve_workspace(workspace, s.N * s.H * s.W, true);
  cudaError_t err = dispatch_logits(dtype, [&](auto tag) {
    generator_upsampled_kernel<decltype(tag)><<<grid_of(ws.G), kThreads, 0, stream>>>(a, up, ws);
    return cudaGetLastError();
  });
  err = then_finalize(err, ws, make_labelled_finalize(6, sums, bad, target, s.H, s.W), stream);
  if (err != cudaSuccess || grad_x.data == nullptr) return err;
  return launch_logit_grad(make_logit_grad(s, x, up, grad_x, no_smoothing()), dtype, false, stream);
}

}  // namespace cuda
}  // namespace fastadvseg
