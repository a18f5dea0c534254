// Host emulation of the CUDA launchers (kernels/cuda/launchers.cuh) for tests on machines without a GPU.
//
// Compiled by the host compiler alone (g++ with the CUDA headers on the include path), it runs the very per-pixel
// functions of kernels/cuda/pixel_ops.cuh that the kernels run, over every pixel in order, then the same epilogue
// arithmetic as the finalize kernel (kernels/cuda/common.cuh). Only the grid loop, the block reduction and the
// launches differ. tests/test_cuda_backend.py drives it through ctypes, behind a stand-in for the torch binding.
#include "pixel_ops.cuh"

using namespace fastadvseg::cuda;

namespace {

template <int K, typename F>
void run(int64_t pixels, F&& pixel, const Epilogue& epi) {
  double sums[K] = {};
  for (int64_t p = 0; p < pixels; ++p) {
    float acc[K] = {};
    pixel(p, acc);
    for (int k = 0; k < K; ++k) sums[k] += acc[k];
  }
  apply_epilogue(sums, epi);
}

// run<K> with the logits' element type: pixel(tag, p, acc), decltype(tag) = float, __half or __nv_bfloat16.
template <int K, typename F>
int run_typed(int dtype, int64_t pixels, const Epilogue& epi, F&& pixel) {
  return dispatch_logits(dtype, [&](auto tag) {
    run<K>(pixels, [&](int64_t p, float* acc) { pixel(tag, p, acc); }, epi);
    return cudaSuccess;
  });
}

}  // namespace

extern "C" {

int emu_softmax2d_forward(Shape4 s, int dtype, Strided4 x, Strided4 y) {
  const SoftmaxArgs a{s, x, y, Strided4{}, Strided4{}};
  return dispatch_logits(dtype, [&](auto tag) {
    for (int64_t p = 0; p < s.N * s.H * s.W; ++p) softmax_forward_pixel<decltype(tag)>(a, p);
    return cudaSuccess;
  });
}

int emu_softmax2d_backward(Shape4 s, int dtype, Strided4 x, Strided4 gy, Strided4 gx) {
  const SoftmaxArgs a{s, x, Strided4{}, gy, gx};
  return dispatch_logits(dtype, [&](auto tag) {
    for (int64_t p = 0; p < s.N * s.H * s.W; ++p) softmax_backward_pixel<decltype(tag)>(a, p);
    return cudaSuccess;
  });
}

int emu_cross_entropy2d_forward(Shape4 s, int dtype, Strided4 x, Strided3 target, const float* weight,
                                int64_t ignore_index, int reduction, float* loss_map, Strided4 grad, Outputs out) {
  const CrossEntropyArgs a{s, x, target, weight, ignore_index, loss_map, grad};
  return run_typed<2>(dtype, s.N * s.H * s.W, make_epilogue(kEpiMean, reduction, out),
                      [&](auto tag, int64_t p, float* acc) { cross_entropy_pixel<decltype(tag)>(a, p, acc); });
}

int emu_bce_with_logits2d_forward(int64_t N, int64_t H, int64_t W, Strided3 z, Strided3 target, float target_value,
                                  Strided3 mask, int reduction, float* loss_map, Strided3 grad, Outputs out) {
  const BceSegment first{H, W, N * H * W, z, target, mask, grad, target_value, loss_map};
  const BceSegment none{1, 1, 0, Strided3{}, Strided3{}, Strided3{}, Strided3{}, 0.f, nullptr};
  run<4>(first.P, [&](int64_t q, float* acc) { bce_pair_pixel(first, none, q, acc); },
         make_epilogue(kEpiMean, reduction, out));
  return 0;
}

int emu_discriminator_loss_forward(const int64_t* fake_nhw, Strided3 fake, Strided3 fake_mask, Strided3 fake_grad,
                                   const int64_t* real_nhw, Strided3 real, Strided3 real_mask, Strided3 real_grad,
                                   Outputs out) {
  const BceSegment first{fake_nhw[1], fake_nhw[2], fake_nhw[0] * fake_nhw[1] * fake_nhw[2], fake, Strided3{},
                         fake_mask, fake_grad, 0.f, nullptr};
  const BceSegment second{real_nhw[1], real_nhw[2], real_nhw[0] * real_nhw[1] * real_nhw[2], real, Strided3{},
                          real_mask, real_grad, 1.f, nullptr};
  run<4>(first.P + second.P, [&](int64_t q, float* acc) { bce_pair_pixel(first, second, q, acc); },
         make_epilogue(kEpiDiscriminator, kReduceMean, out));
  return 0;
}

int emu_semi_cross_entropy2d_forward(Shape4 s, int dtype, Strided4 x, Strided3 z, float threshold, Strided3 mask,
                                     int reduction, float* loss_map, Strided4 grad, Outputs out) {
  const SemiArgs a{s, x, z, mask, threshold, loss_map, grad};
  return run_typed<3>(dtype, s.N * s.H * s.W, make_epilogue(kEpiSemi, reduction, out),
                      [&](auto tag, int64_t p, float* acc) { semi_pixel<decltype(tag)>(a, p, acc); });
}

int emu_generator_loss_forward(Shape4 s, int dtype, Strided4 x, Strided3 z, Strided3 target, int64_t ignore_index,
                               double lambda_adv, double lambda_semi, float threshold, Strided4 grad_x,
                               Strided3 grad_z, Outputs out) {
  const GeneratorArgs a{s, x, z, target, ignore_index, threshold, grad_x, grad_z};
  Epilogue epi = make_epilogue(kEpiGenerator, kReduceMean, out);
  epi.labelled = target.data != nullptr ? 1 : 0;
  epi.lambda_adv = lambda_adv;
  epi.lambda_semi = lambda_semi;
  epi.pixels = static_cast<double>(s.N * s.H * s.W);
  return run_typed<6>(dtype, s.N * s.H * s.W, epi,
                      [&](auto tag, int64_t p, float* acc) { generator_pixel<decltype(tag)>(a, p, acc); });
}

int emu_one_hot2d_forward(Shape4 s, Strided3 target, int64_t ignore_index, void* out, int elem_size,
                          uint64_t one_bits) {
  const int64_t P = s.N * s.H * s.W;
  auto fill = [&](auto zero) {
    using U = decltype(zero);
    for (int64_t p = 0; p < P; ++p) {
      one_hot_pixel<U>(s, target, ignore_index, static_cast<U*>(out), static_cast<U>(one_bits), p);
    }
    return 0;
  };
  switch (elem_size) {
    case 1: return fill(uint8_t{});
    case 2: return fill(uint16_t{});
    case 4: return fill(uint32_t{});
    case 8: return fill(uint64_t{});
    default: return 1;
  }
}

}  // extern "C"
