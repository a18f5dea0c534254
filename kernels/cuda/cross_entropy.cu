// cross_entropy2d: per pixel with a valid label y (y != ignore_index, 0 <= y < C; anything else is ignored and
// never used as an index): nll = logsumexp_c(x) - x_y, loss = w_y * nll (w_y = 1 without class weights).
// Sums: S = sum loss, W = sum w_y; "mean" = S / W (PyTorch's weighted mean; S / 1 when W <= 0, so 0 when nothing counts),
// "sum" = S, "none" = the per-pixel map (0 where ignored).
// Gradient of the unnormalised sum S, written in the same pass: g_c = w_y * (softmax(x)_c - [c == y]), 0 at
// ignored pixels (their logits are never read, so a NaN there never reaches the loss).
// Bytes moved (E = bytes per logit): reads the logits once from DRAM (E per element; the gradient sweep re-reads
// the pixel's C values from L1/L2) and 8 bytes of label per pixel; writes the gradient (E per element) when
// requested and 4 bytes per pixel for "none"; plus 2 floats per block of partial sums.
#include "pixel_ops.cuh"

namespace fastadvseg {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) cross_entropy_kernel(CrossEntropyArgs a, float* __restrict__ partials,
                                                                 int64_t G) {
  float acc[2] = {0.f, 0.f};
  FASTADVSEG_PIXEL_LOOP(p, a.s.N * a.s.H * a.s.W) cross_entropy_pixel<T>(a, p, acc);
  block_sums_to_partials<2>(acc, partials, G);
}

}  // namespace

cudaError_t cross_entropy2d_forward(Shape4 s, int dtype, Strided4 x, Strided3 target, const float* weight,
                                    int64_t ignore_index, int reduction, float* loss_map, Strided4 grad,
                                    float* partials, Outputs out, cudaStream_t stream) {
  const CrossEntropyArgs a{s, x, target, weight, ignore_index, loss_map, grad};
  const int64_t G = grid_blocks(s.N * s.H * s.W);
  const cudaError_t err = dispatch_logits(dtype, [&](auto tag) {
    cross_entropy_kernel<decltype(tag)><<<grid_of(G), kThreads, 0, stream>>>(a, partials, G);
    return cudaGetLastError();
  });
  return then_finalize(err, partials, G, 2, make_epilogue(kEpiMean, reduction, out), stream);
}

}  // namespace cuda
}  // namespace fastadvseg
