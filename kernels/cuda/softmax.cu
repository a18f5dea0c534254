// softmax2d: y[n,c,h,w] = exp(x_c - m) / sum_k exp(x_k - m), m = max_k x_k, per pixel over the C channels.
// Backward: gx_c = y_c * (gy_c - sum_k y_k gy_k).
// One thread per pixel, float32 math for float/half/bfloat16 data, any strides (int64). Non-finite logits as in
// PyTorch (see row_stats in common.cuh).
// Bytes moved (E = bytes per element, N*C*H*W elements): forward reads the logits once from DRAM (the second
// sweep of a pixel's C values hits L1/L2) and writes y: 2*E per element; backward reads y and gy, writes gx:
// 3*E per element.
#include "common.cuh"

namespace fastadvseg {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) softmax_forward_kernel(Shape4 s, Strided4 x, Strided4 y) {
  const int64_t HW = s.H * s.W;
  const int64_t P = s.N * HW;
  const T* __restrict__ xp = static_cast<const T*>(x.data);
  T* __restrict__ yp = static_cast<T*>(y.data);
  FASTADVSEG_PIXEL_LOOP(p, P) {
    const Pixel px = split_pixel(p, HW, s.W);
    const int64_t xb = offset4(x, px);
    const int64_t yb = offset4(y, px);
    const RowStats r = row_stats<T, false>(xp, xb, x.sc, s.C, -1);
    const float inv_s = 1.f / r.s;
    for_channels(xp, xb, x.sc, 0, s.C,
                 [&](int64_t c, float v) { yp[yb + c * y.sc] = from_float<T>(expf(v - r.m) * inv_s); });
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) softmax_backward_kernel(Shape4 s, Strided4 y, Strided4 gy, Strided4 gx) {
  const int64_t HW = s.H * s.W;
  const int64_t P = s.N * HW;
  const T* __restrict__ yp = static_cast<const T*>(y.data);
  const T* __restrict__ gyp = static_cast<const T*>(gy.data);
  T* __restrict__ gxp = static_cast<T*>(gx.data);
  FASTADVSEG_PIXEL_LOOP(p, P) {
    const Pixel px = split_pixel(p, HW, s.W);
    const int64_t yb = offset4(y, px);
    const int64_t gyb = offset4(gy, px);
    const int64_t gxb = offset4(gx, px);
    float dot = 0.f;
    for_channels(yp, yb, y.sc, 0, s.C, [&](int64_t c, float yc) { dot += yc * to_float(gyp[gyb + c * gy.sc]); });
    for_channels(yp, yb, y.sc, 0, s.C, [&](int64_t c, float yc) {
      gxp[gxb + c * gx.sc] = from_float<T>(yc * (to_float(gyp[gyb + c * gy.sc]) - dot));
    });
  }
}

}  // namespace

cudaError_t softmax2d_forward(Shape4 s, int dtype, Strided4 x, Strided4 y, cudaStream_t stream) {
  return dispatch_logits(dtype, [&](auto tag) {
    softmax_forward_kernel<decltype(tag)><<<grid_of(grid_blocks(s.N * s.H * s.W)), kThreads, 0, stream>>>(s, x, y);
    return cudaGetLastError();
  });
}

cudaError_t softmax2d_backward(Shape4 s, int dtype, Strided4 y, Strided4 gy, Strided4 gx, cudaStream_t stream) {
  return dispatch_logits(dtype, [&](auto tag) {
    softmax_backward_kernel<decltype(tag)><<<grid_of(grid_blocks(s.N * s.H * s.W)), kThreads, 0, stream>>>(s, y, gy,
                                                                                                          gx);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fastadvseg
