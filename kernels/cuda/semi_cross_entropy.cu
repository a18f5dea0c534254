// semi_cross_entropy2d (L_semi): per pixel not ignore-masked ("considered"), keep = sigmoid(float32(z)) > T;
// at kept pixels the pseudo-label is yhat = argmax_c x (first maximum on ties) and
// nll = logsumexp_c(x) - x_yhat. S = sum nll over kept pixels, K = kept count; "mean" = S / K (0 when K = 0),
// "sum" = S, "none" = per-pixel map; ratio = K / max(considered, 1).
// Gradient of S (to the logits only; z and yhat are constants): softmax(x)_c - [c == yhat] at kept pixels, 0
// elsewhere; the logits of pixels that are not kept are never read.
// Bytes moved (E = bytes per logit, Ez per map element): reads the logits of kept pixels once from DRAM
// (E per element), z (Ez per pixel) and the mask (1 byte per pixel) if any; writes the gradient (E per element)
// when requested, 4 bytes per pixel for "none", 3 floats per block of partial sums.
#include "pixel_ops.cuh"

namespace fastadvseg {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) semi_kernel(SemiArgs a, float* __restrict__ partials, int64_t G) {
  float acc[3] = {0.f, 0.f, 0.f};
  FASTADVSEG_PIXEL_LOOP(p, a.s.N * a.s.H * a.s.W) semi_pixel<T>(a, p, acc);
  block_sums_to_partials<3>(acc, partials, G);
}

}  // namespace

cudaError_t semi_cross_entropy2d_forward(Shape4 s, int dtype, Strided4 x, Strided3 z, float threshold,
                                         Strided3 mask, int reduction, float* loss_map, Strided4 grad,
                                         float* partials, Outputs out, cudaStream_t stream) {
  const SemiArgs a{s, x, z, mask, threshold, loss_map, grad};
  const int64_t G = grid_blocks(s.N * s.H * s.W);
  const cudaError_t err = dispatch_logits(dtype, [&](auto tag) {
    semi_kernel<decltype(tag)><<<grid_of(G), kThreads, 0, stream>>>(a, partials, G);
    return cudaGetLastError();
  });
  return then_finalize(err, partials, G, 3, make_epilogue(kEpiSemi, reduction, out), stream);
}

}  // namespace cuda
}  // namespace fastadvseg
