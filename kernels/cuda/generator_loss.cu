// generator_loss: the generator's whole loss in one pass over the logits x (N, C, H, W) and the discriminator
// logits z (N, H, W).
//  labelled (target given), at pixels with a valid label y:
//     ce   += logsumexp(x) - x_y                     Gx = softmax(x) - onehot(y)
//     adv  += BCE(z, 1) = softplus(-z)   Gz = sigmoid(z) - 1
//     total = ce/n_valid + l_adv * adv/n_valid
//  unlabelled, at every pixel: adv += BCE(z, 1), Gz = sigmoid(z) - 1; where sigmoid(z) > T (kept) with
//     yhat = argmax_c x: semi += logsumexp(x) - x_yhat, Gx = softmax(x) - onehot(yhat)
//     total = l_adv * adv/P + l_semi * semi/n_kept, ratio = n_kept / P
// Gx and Gz are the gradients of the unnormalised sums (0 where a pixel does not count); backward scales them
// by (g_total + g_ce)/n_valid or (l_semi*g_total + g_semi)/n_kept, and (l_adv*g_total + g_adv)/n_adv.
// Bytes moved (E = bytes per logit, Ez per z element): reads the logits once from DRAM (E per element, only at
// counted pixels), the label (8 bytes per pixel) and z (Ez per pixel); writes Gx (E per element) and Gz (Ez per
// pixel) when requested, plus 6 floats per block of partial sums.
#include "pixel_ops.cuh"

namespace fastadvseg {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) generator_kernel(GeneratorArgs a, float* __restrict__ partials, int64_t G) {
  float acc[6] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  FASTADVSEG_PIXEL_LOOP(p, a.s.N * a.s.H * a.s.W) generator_pixel<T>(a, p, acc);
  block_sums_to_partials<6>(acc, partials, G);
}

}  // namespace

cudaError_t generator_loss_forward(Shape4 s, int dtype, Strided4 x, Strided3 z, Strided3 target,
                                   int64_t ignore_index, double lambda_adv, double lambda_semi, float threshold,
                                   Strided4 grad_x, Strided3 grad_z, float* partials, Outputs out,
                                   cudaStream_t stream) {
  const GeneratorArgs a{s, x, z, target, ignore_index, threshold, grad_x, grad_z};
  const int64_t P = s.N * s.H * s.W;
  const int64_t G = grid_blocks(P);
  const cudaError_t err = dispatch_logits(dtype, [&](auto tag) {
    generator_kernel<decltype(tag)><<<grid_of(G), kThreads, 0, stream>>>(a, partials, G);
    return cudaGetLastError();
  });
  Epilogue epi = make_epilogue(kEpiGenerator, kReduceMean, out);
  epi.labelled = target.data != nullptr ? 1 : 0;
  epi.lambda_adv = lambda_adv;
  epi.lambda_semi = lambda_semi;
  epi.pixels = static_cast<double>(P);
  return then_finalize(err, partials, G, 6, epi, stream);
}

}  // namespace cuda
}  // namespace fastadvseg
