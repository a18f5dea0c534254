// The kernels shared by the fused bilinear upsampling of every op (see launchers.cuh): the gather of the logits'
// gradient at their own resolution after a loss kernel on the label grid (cross_entropy.cu, semi_cross_entropy.cu,
// generator_loss.cu), and the upsampling of a discriminator map to a float32 map at the label grid with the
// gather of its gradient back to the map's resolution.
// Logits gradient: one thread per element (n, c, i, j) of the (N, C, h, w) gradient sums over the label-grid pixels
// (h', w') that read low-resolution pixel (i, j) (about (2H/h) x (2W/w) of them), in a fixed order, weight *
// nll_grad(exp(x_c - lse) ...) with x_c interpolated again at (h', w') from the low-resolution logits (4 reads,
// from L1/L2) and lse, sel from the 8-byte state of the pixel; no atomics, so the gradient is the same bits on
// every run. Bytes moved: reads each pixel's state about 4 times (8 bytes; mostly from L2), the low-resolution
// logits (E per element, from L1/L2 after the first read) and writes the gradient (E per element).
// Maps: upsample_map reads 4 map elements per label-grid pixel (from L1/L2) and writes 4 bytes; map_grad_gather
// reads each float32 gradient element about 4 times (mostly from L2) and writes the map's gradient.
#include "pixel_ops.cuh"

namespace fastadvseg {
namespace cuda {
namespace {

template <typename T, bool kSmooth>
__global__ void __launch_bounds__(kThreads) logit_grad_kernel(LogitGradArgs a) {
  FASTADVSEG_PIXEL_LOOP(q, a.s.N * a.s.C * a.s.H * a.s.W) logit_grad_element<T, kSmooth>(a, q);
}

__global__ void __launch_bounds__(kThreads) map_upsample_kernel(MapResample a) {
  FASTADVSEG_PIXEL_LOOP(p, a.N * a.H * a.W) map_upsample_pixel(a, p);
}

__global__ void __launch_bounds__(kThreads) map_grad_kernel(MapResample a) {
  FASTADVSEG_PIXEL_LOOP(q, a.N * a.rows.in * a.cols.in) map_grad_element(a, q);
}

}  // namespace

cudaError_t launch_logit_grad(const LogitGradArgs& a, int dtype, bool smooth, cudaStream_t stream) {
  const unsigned blocks = grid_of(grid_blocks(a.s.N * a.s.C * a.s.H * a.s.W));
  return dispatch_logits(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (smooth) {
      logit_grad_kernel<T, true><<<blocks, kThreads, 0, stream>>>(a);
    } else {
      logit_grad_kernel<T, false><<<blocks, kThreads, 0, stream>>>(a);
    }
    return cudaGetLastError();
  });
}

cudaError_t upsample_map(int64_t N, int64_t h, int64_t w, Strided3 z, int64_t H, int64_t W, bool align_corners,
                         float* out, cudaStream_t stream) {
  const MapResample a{N, H, W, make_axis(h, H, align_corners), make_axis(w, W, align_corners), z, out};
  map_upsample_kernel<<<grid_of(grid_blocks(N * H * W)), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t map_grad_gather(int64_t N, int64_t H, int64_t W, const float* g, int64_t h, int64_t w,
                            bool align_corners, Strided3 out, cudaStream_t stream) {
  const MapResample a{N, H, W, make_axis(h, H, align_corners), make_axis(w, W, align_corners), out,
                      const_cast<float*>(g)};
  map_grad_kernel<<<grid_of(grid_blocks(N * h * w)), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastadvseg
