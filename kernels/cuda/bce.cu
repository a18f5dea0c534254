// bce_with_logits2d and discriminator_loss (two maps, one launch).
// Per counted pixel (not ignore-masked): loss = (1 - t)*z + softplus(-z) (PyTorch's form, stable),
// d loss / dz = sigmoid(z) - t. Masked pixels give 0 loss and 0 gradient (a NaN there never reaches the sum).
// bce: S = sum loss, K = counted pixels; "mean" = S / K (0 when K = 0), "sum" = S, "none" = per-pixel map.
// discriminator: BCE(fake, 0) mean + BCE(real, 1) mean; the two maps may have different shapes: the grid walks
// the fake pixels, then the real ones.
// Map dtypes (logits, targets, gradients) are runtime codes (float32/float16/bfloat16/float64), math in float32.
// Bytes moved per pixel (E = bytes per map element): read z (E), target map if any, mask (1) if any;
// write the gradient (E) when requested and 4 bytes for "none". No logits-sized tensor is involved.
#include "common.cuh"

namespace fastadvseg {
namespace cuda {
namespace {

struct BceSegment {
  int64_t H, W, HW, P;
  Strided3 z, target, mask, grad;
  float target_value;
  float* loss_map;
};

__device__ __forceinline__ void bce_pixel(const BceSegment& seg, int64_t p, float& sum, float& count) {
  const Pixel px = split_pixel(p, seg.HW, seg.W);
  float loss = 0.f;
  if (!masked(seg.mask, px)) {
    const float z = load_map(seg.z, offset3(seg.z, px));
    const float t = seg.target.data != nullptr ? load_map(seg.target, offset3(seg.target, px)) : seg.target_value;
    loss = bce_logits(z, t);
    sum += loss;
    count += 1.f;
    if (seg.grad.data != nullptr) store_map(seg.grad, offset3(seg.grad, px), sigmoid(z) - t);
  } else if (seg.grad.data != nullptr) {
    store_map(seg.grad, offset3(seg.grad, px), 0.f);
  }
  if (seg.loss_map != nullptr) seg.loss_map[p] = loss;
}

__global__ void __launch_bounds__(kThreads) bce_kernel(BceSegment first, BceSegment second, float* __restrict__ partials,
                                                       int64_t G) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};  // first sum, first count, second sum, second count
  FASTADVSEG_PIXEL_LOOP(q, first.P + second.P) {
    if (q < first.P) {
      bce_pixel(first, q, acc[0], acc[1]);
    } else {
      bce_pixel(second, q - first.P, acc[2], acc[3]);
    }
  }
  block_sums_to_partials<4>(acc, partials, G);
}

BceSegment segment(int64_t N, int64_t H, int64_t W, Strided3 z, Strided3 target, float target_value, Strided3 mask,
                   Strided3 grad, float* loss_map) {
  BceSegment seg;
  seg.H = H;
  seg.W = W;
  seg.HW = H * W;
  seg.P = N * H * W;
  seg.z = z;
  seg.target = target;
  seg.mask = mask;
  seg.grad = grad;
  seg.target_value = target_value;
  seg.loss_map = loss_map;
  return seg;
}

Strided3 absent() {
  Strided3 m{};
  m.data = nullptr;
  return m;
}

cudaError_t launch(const BceSegment& first, const BceSegment& second, float* partials, int64_t G, cudaStream_t stream) {
  bce_kernel<<<grid_of(G), kThreads, 0, stream>>>(first, second, partials, G);
  return cudaGetLastError();
}

}  // namespace

cudaError_t bce_with_logits2d_forward(int64_t N, int64_t H, int64_t W, Strided3 z, Strided3 target,
                                      float target_value, Strided3 mask, int reduction, float* loss_map,
                                      Strided3 grad, float* partials, Outputs out, cudaStream_t stream) {
  const BceSegment first = segment(N, H, W, z, target, target_value, mask, grad, loss_map);
  const BceSegment second = segment(0, 1, 1, absent(), absent(), 0.f, absent(), absent(), nullptr);
  const int64_t G = grid_blocks(first.P);
  // finalize reads rows 0, 1 of the 4: the first segment's sum and count
  return then_finalize(launch(first, second, partials, G, stream), partials, G, 2,
                       make_epilogue(kEpiMean, reduction, out), stream);
}

cudaError_t discriminator_loss_forward(const int64_t* fake_nhw, Strided3 fake, Strided3 fake_mask, Strided3 fake_grad,
                                       const int64_t* real_nhw, Strided3 real, Strided3 real_mask, Strided3 real_grad,
                                       float* partials, Outputs out, cudaStream_t stream) {
  const BceSegment first = segment(fake_nhw[0], fake_nhw[1], fake_nhw[2], fake, absent(), 0.f, fake_mask, fake_grad,
                                   nullptr);
  const BceSegment second = segment(real_nhw[0], real_nhw[1], real_nhw[2], real, absent(), 1.f, real_mask, real_grad,
                                    nullptr);
  const int64_t G = grid_blocks(first.P + second.P);
  return then_finalize(launch(first, second, partials, G, stream), partials, G, 4,
                       make_epilogue(kEpiDiscriminator, kReduceMean, out), stream);
}

}  // namespace cuda
}  // namespace fastadvseg
