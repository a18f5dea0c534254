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
#include "common.cuh"

namespace fastadvseg {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
generator_kernel(Shape4 s, Strided4 x, Strided3 z, Strided3 target, int64_t ignore_index, float threshold,
                 Strided4 grad_x, Strided3 grad_z, float* __restrict__ partials, int64_t G) {
  const int64_t HW = s.H * s.W;
  const int64_t P = s.N * HW;
  const T* __restrict__ xp = static_cast<const T*>(x.data);
  T* __restrict__ gxp = static_cast<T*>(grad_x.data);
  const bool labelled = target.data != nullptr;
  // ce sum, ce count, adv sum, adv count, semi sum, semi count
  float acc[6] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  FASTADVSEG_PIXEL_LOOP(p, P) {
    const Pixel px = split_pixel(p, HW, s.W);
    int64_t sel = -1;    // the class whose nll counts at this pixel, -1 if none
    bool adv_counts;     // whether BCE(z, 1) counts at this pixel
    float zv = 0.f;
    RowStats r{};
    const int64_t xb = offset4(x, px);
    if (labelled) {
      sel = valid_label(target, px, s.C, ignore_index);
      adv_counts = sel >= 0;
      if (adv_counts) zv = load_map(z, offset3(z, px));
      if (sel >= 0) {
        r = row_stats<T, false>(xp, xb, x.sc, s.C, sel);
        const float nll = r.m + logf(r.s) - r.xsel;
        acc[0] += nll;
        acc[1] += 1.f;
      }
    } else {
      adv_counts = true;
      zv = load_map(z, offset3(z, px));
      if (sigmoid(zv) > threshold) {
        r = row_stats<T, true>(xp, xb, x.sc, s.C, -1);
        sel = r.arg;
        const float nll = r.m + logf(r.s) - r.xsel;
        acc[4] += nll;
        acc[5] += 1.f;
      }
    }
    if (adv_counts) {
      acc[2] += bce_logits(zv, 1.f);
      acc[3] += 1.f;
    }
    if (grad_z.data != nullptr) store_map(grad_z, offset3(grad_z, px), adv_counts ? sigmoid(zv) - 1.f : 0.f);
    if (gxp != nullptr) {
      if (sel >= 0) {
        write_nll_grad<T>(xp, xb, x.sc, gxp, offset4(grad_x, px), grad_x.sc, s.C, r, sel, 1.f);
      } else {
        write_zeros<T>(gxp, offset4(grad_x, px), grad_x.sc, s.C);
      }
    }
  }
  block_sums_to_partials<6>(acc, partials, G);
}

}  // namespace

cudaError_t generator_loss_forward(Shape4 s, int dtype, Strided4 x, Strided3 z, Strided3 target,
                                   int64_t ignore_index, double lambda_adv, double lambda_semi, float threshold,
                                   Strided4 grad_x, Strided3 grad_z, float* partials, Outputs out,
                                   cudaStream_t stream) {
  const int64_t P = s.N * s.H * s.W;
  const int64_t G = grid_blocks(P);
  const cudaError_t err = dispatch_logits(dtype, [&](auto tag) {
    generator_kernel<decltype(tag)><<<grid_of(G), kThreads, 0, stream>>>(s, x, z, target, ignore_index, threshold,
                                                                         grad_x, grad_z, partials, G);
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
