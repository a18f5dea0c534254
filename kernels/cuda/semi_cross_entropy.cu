// semi_cross_entropy2d (L_semi): per pixel not ignore-masked ("considered"), keep = sigmoid(float32(z)) > T;
// at kept pixels the pseudo-label is yhat = argmax_c x (first maximum on ties) and
// nll = logsumexp_c(x) - x_yhat. S = sum nll over kept pixels, K = kept count; "mean" = S / K (0 when K = 0),
// "sum" = S, "none" = per-pixel map; ratio = K / max(considered, 1).
// Gradient of S (to the logits only; z and yhat are constants): softmax(x)_c - [c == yhat] at kept pixels, 0
// elsewhere; the logits of pixels that are not kept are never read.
// Bytes moved (E = bytes per logit, Ez per map element): reads the logits of kept pixels once from DRAM
// (E per element), z (Ez per pixel) and the mask (1 byte per pixel) if any; writes the gradient (E per element)
// when requested, 4 bytes per pixel for "none", 3 floats per block of partial sums.
#include "common.cuh"

namespace fastadvseg {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
semi_kernel(Shape4 s, Strided4 x, Strided3 z, float threshold, Strided3 mask, float* __restrict__ loss_map,
            Strided4 grad, float* __restrict__ partials, int64_t G) {
  const int64_t HW = s.H * s.W;
  const int64_t P = s.N * HW;
  const T* __restrict__ xp = static_cast<const T*>(x.data);
  T* __restrict__ gp = static_cast<T*>(grad.data);
  float acc[3] = {0.f, 0.f, 0.f};  // sum of nll over kept pixels, kept, considered
  FASTADVSEG_PIXEL_LOOP(p, P) {
    const Pixel px = split_pixel(p, HW, s.W);
    bool keep = false;
    if (!masked(mask, px)) {
      acc[2] += 1.f;
      keep = sigmoid(load_map(z, offset3(z, px))) > threshold;  // NaN z: not kept
    }
    float loss = 0.f;
    if (keep) {
      const int64_t xb = offset4(x, px);
      const RowStats r = row_stats<T, true>(xp, xb, x.sc, s.C, -1);
      loss = r.m + logf(r.s) - r.xsel;
      acc[0] += loss;
      acc[1] += 1.f;
      if (gp != nullptr) write_nll_grad<T>(xp, xb, x.sc, gp, offset4(grad, px), grad.sc, s.C, r, r.arg, 1.f);
    } else if (gp != nullptr) {
      write_zeros<T>(gp, offset4(grad, px), grad.sc, s.C);
    }
    if (loss_map != nullptr) loss_map[p] = loss;
  }
  block_sums_to_partials<3>(acc, partials, G);
}

}  // namespace

cudaError_t semi_cross_entropy2d_forward(Shape4 s, int dtype, Strided4 x, Strided3 z, float threshold,
                                         Strided3 mask, int reduction, float* loss_map, Strided4 grad,
                                         float* partials, Outputs out, cudaStream_t stream) {
  const int64_t G = grid_blocks(s.N * s.H * s.W);
  const cudaError_t err = dispatch_logits(dtype, [&](auto tag) {
    semi_kernel<decltype(tag)><<<grid_of(G), kThreads, 0, stream>>>(s, x, z, threshold, mask, loss_map, grad,
                                                                    partials, G);
    return cudaGetLastError();
  });
  return then_finalize(err, partials, G, 3, make_epilogue(kEpiSemi, reduction, out), stream);
}

}  // namespace cuda
}  // namespace fastadvseg
