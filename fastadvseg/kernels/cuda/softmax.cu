// softmax2d: y[n,c,h,w] = exp(x_c - m) / sum_k exp(x_k - m), m = max_k x_k, per pixel over the C channels.
// Backward: gx_c = p_c * (gy_c - sum_k p_k gy_k) from the saved probabilities p = y (as stored: same dtype as x),
// in float32 math; the logits are not read.
// One thread per pixel, float32 math for float/half/bfloat16 data, any strides (int64). Non-finite logits as in
// PyTorch (see row_stats in common.cuh).
// Bytes moved (E = bytes per element, N*C*H*W elements): forward reads the logits once from DRAM (the second
// sweep of a pixel's C values hits L1/L2) and writes y: 2*E per element; backward reads p and gy once from DRAM
// (the second sweep hits L1/L2) and writes gx: 3*E per element.
// Upsampled logits x (N, C, h, w), label grid (H, W): the forward interpolates each pixel's logits from the four
// low-resolution pixels around it (two sweeps, reads from L1/L2) and writes y at (H, W): E per element of y plus
// the low-resolution logits. The backward first writes dot = sum_c p*gy per label-grid pixel (reads p and gy once:
// 2*E per element, 4 bytes per pixel), then each gradient element gathers p (gy - dot) * weight over the pixels
// it feeds (every p, gy element is read by about 4 threads, mostly from L2) and writes gx at (N, C, h, w).
#include "pixel_ops.cuh"

namespace fastadvseg {
namespace cuda {
namespace {

// accepted spill of `softmax_forward_kernel<float>`: 8 bytes (nvcc 13.0, sm_90), one store and one load per pixel.
// (A 64-bit value is kept in local memory across the pixel's two channel sweeps, next to their 2C loads, C stores.)
template <typename T>
__global__ void __launch_bounds__(kThreads) softmax_forward_kernel(SoftmaxArgs a) {
  FASTADVSEG_PIXEL_LOOP(p, a.s.N * a.s.H * a.s.W) softmax_forward_pixel<T>(a, p);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) softmax_backward_kernel(SoftmaxArgs a) {
  FASTADVSEG_PIXEL_LOOP(p, a.s.N * a.s.H * a.s.W) softmax_backward_pixel<T>(a, p);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) softmax_upsampled_kernel(SoftmaxArgs a, Upsampled up) {
  FASTADVSEG_PIXEL_LOOP(p, a.s.N * a.s.H * a.s.W) softmax_forward_pixel<T>(a, p, up);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) softmax_dot_kernel(SoftmaxGradArgs a) {
  FASTADVSEG_PIXEL_LOOP(p, a.s.N * a.H * a.W) softmax_dot_pixel<T>(a, p);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) softmax_grad_kernel(SoftmaxGradArgs a) {
  FASTADVSEG_PIXEL_LOOP(q, a.s.N * a.s.C * a.s.H * a.s.W) softmax_grad_element<T>(a, q);
}

}  // namespace

cudaError_t softmax2d_forward(Shape4 s, int dtype, Strided4 x, Strided4 y, cudaStream_t stream) {
  const SoftmaxArgs a{s, x, y, Strided4{}, Strided4{}, Strided4{}};
  return dispatch_logits(dtype, [&](auto tag) {
    softmax_forward_kernel<decltype(tag)><<<grid_of(grid_blocks(s.N * s.H * s.W)), kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

cudaError_t softmax2d_backward(Shape4 s, int dtype, Strided4 p, Strided4 gy, Strided4 gx, cudaStream_t stream) {
  const SoftmaxArgs a{s, Strided4{}, Strided4{}, p, gy, gx};
  return dispatch_logits(dtype, [&](auto tag) {
    softmax_backward_kernel<decltype(tag)><<<grid_of(grid_blocks(s.N * s.H * s.W)), kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

cudaError_t softmax2d_upsampled_forward(Shape4 s, int dtype, Strided4 x, Upsample upsample, Strided4 y,
                                        cudaStream_t stream) {
  const SoftmaxArgs a{s, x, y, Strided4{}, Strided4{}, Strided4{}};
  const Upsampled up = make_upsampled(upsample, s.H, s.W);
  return dispatch_logits(dtype, [&](auto tag) {
    softmax_upsampled_kernel<decltype(tag)><<<grid_of(grid_blocks(s.N * s.H * s.W)), kThreads, 0, stream>>>(a, up);
    return cudaGetLastError();
  });
}

cudaError_t softmax2d_upsampled_backward(Shape4 s, int dtype, Strided4 p, Strided4 gy, Upsample upsample, Strided4 gx,
                                         cudaStream_t stream) {
  const SoftmaxGradArgs a{Shape4{s.N, s.C, upsample.h, upsample.w}, s.H, s.W,
                          make_axis(upsample.h, s.H, upsample.align_corners),
                          make_axis(upsample.w, s.W, upsample.align_corners), p, gy, gx,
                          static_cast<float*>(upsample.scratch)};
  return dispatch_logits(dtype, [&](auto tag) {
    using T = decltype(tag);
    softmax_dot_kernel<T><<<grid_of(grid_blocks(s.N * s.H * s.W)), kThreads, 0, stream>>>(a);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    softmax_grad_kernel<T><<<grid_of(grid_blocks(a.s.N * a.s.C * a.s.H * a.s.W)), kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fastadvseg
