// cross_entropy2d: per pixel with a valid label y (y != ignore_index, 0 <= y < C; anything else is ignored and
// never used as an index): nll = logsumexp_c(x) - x_y, loss = w_y * nll (w_y = 1 without class weights).
// Sums: S = sum loss, W = sum w_y; "mean" = S / W (PyTorch's weighted mean; S / 1 when W <= 0, so 0 when nothing counts),
// "sum" = S, "none" = the per-pixel map (0 where ignored).
// Gradient of the unnormalised sum S, written in the same pass: g_c = w_y * (softmax(x)_c - [c == y]), 0 at
// ignored pixels (their logits are never read, so a NaN there never reaches the loss).
// Bytes moved (E = bytes per logit): reads the logits once from DRAM (E per element; the gradient sweep re-reads
// the pixel's C values from L1/L2) and 8 bytes of label per pixel; writes the gradient (E per element) when
// requested and 4 bytes per pixel for "none"; plus 2 floats per block of partial sums.
#include "common.cuh"

namespace fastadvseg {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
cross_entropy_kernel(Shape4 s, Strided4 x, Strided3 target, const float* __restrict__ weight, int64_t ignore_index,
                     float* __restrict__ loss_map, Strided4 grad, float* __restrict__ partials, int64_t G) {
  const int64_t HW = s.H * s.W;
  const int64_t P = s.N * HW;
  const T* __restrict__ xp = static_cast<const T*>(x.data);
  T* __restrict__ gp = static_cast<T*>(grad.data);
  float acc[2] = {0.f, 0.f};  // sum of w*nll, sum of w
  FASTADVSEG_PIXEL_LOOP(p, P) {
    const Pixel px = split_pixel(p, HW, s.W);
    const int64_t y = valid_label(target, px, s.C, ignore_index);
    float loss = 0.f;
    if (y >= 0) {
      const int64_t xb = offset4(x, px);
      const RowStats r = row_stats<T, false>(xp, xb, x.sc, s.C, y);
      const float wy = weight != nullptr ? weight[y] : 1.f;
      loss = (r.m + logf(r.s) - r.xsel) * wy;
      acc[0] += loss;
      acc[1] += wy;
      if (gp != nullptr) write_nll_grad<T>(xp, xb, x.sc, gp, offset4(grad, px), grad.sc, s.C, r, y, wy);
    } else if (gp != nullptr) {
      write_zeros<T>(gp, offset4(grad, px), grad.sc, s.C);
    }
    if (loss_map != nullptr) loss_map[p] = loss;
  }
  block_sums_to_partials<2>(acc, partials, G);
}

}  // namespace

cudaError_t cross_entropy2d_forward(Shape4 s, int dtype, Strided4 x, Strided3 target, const float* weight,
                                    int64_t ignore_index, int reduction, float* loss_map, Strided4 grad,
                                    float* partials, Outputs out, cudaStream_t stream) {
  const int64_t G = grid_blocks(s.N * s.H * s.W);
  const cudaError_t err = dispatch_logits(dtype, [&](auto tag) {
    cross_entropy_kernel<decltype(tag)><<<grid_of(G), kThreads, 0, stream>>>(s, x, target, weight, ignore_index,
                                                                             loss_map, grad, partials, G);
    return cudaGetLastError();
  });
  return then_finalize(err, partials, G, 2, make_epilogue(kEpiMean, reduction, out), stream);
}

}  // namespace cuda
}  // namespace fastadvseg
