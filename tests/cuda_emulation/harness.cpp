// Host emulation of the CUDA launchers (fastadvseg/kernels/cuda/launchers.cuh) for tests on machines without a GPU.
//
// Compiled by the host compiler alone (g++ with the CUDA headers on the include path), it runs the very per-pixel
// functions of fastadvseg/kernels/cuda/pixel_ops.cuh that the kernels run, over every pixel in order (so the first bad label a
// pixel function records is the first in pixel order), then the finalize block's own result code (write_results in
// fastadvseg/kernels/cuda/common.cuh) on the float64 column sums; the gathers of upsampled inputs' gradients run
// their per-element functions over every element. Only the grid loop, the block reductions and the launches
// differ. tests/cuda_emulation/emulated_ext.py drives it through ctypes, behind a stand-in for the torch binding.
#include "pixel_ops.cuh"

using namespace fastadvseg::cuda;

namespace {

// pixel(p, acc, first_bad) over p = 0 .. pixels-1; acc has `rows` floats (K sums, + the bad count when labelled).
template <int kRows, typename F>
void run(int64_t pixels, const Finalize& fin, F&& pixel) {
  double col[kRows] = {};
  int64_t first_bad = kNoBad;
  for (int64_t p = 0; p < pixels; ++p) {
    float acc[kRows] = {};
    pixel(p, acc, first_bad);
    for (int k = 0; k < kRows; ++k) col[k] += acc[k];
  }
  write_results(col, first_bad, fin);
}

// launch_logit_grad (upsample.cu): logit_grad_element over every element of the gradient.
int logit_grad(const LogitGradArgs& a, int dtype, bool smooth) {
  const int64_t Q = a.s.N * a.s.C * a.s.H * a.s.W;
  return dispatch_logits(dtype, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t q = 0; q < Q; ++q) {
      if (smooth) {
        logit_grad_element<T, true>(a, q);
      } else {
        logit_grad_element<T, false>(a, q);
      }
    }
    return cudaSuccess;
  });
}

}  // namespace

extern "C" {

int emu_softmax2d_forward(Shape4 s, int dtype, Strided4 x, Strided4 y) {
  const SoftmaxArgs a{s, x, y, Strided4{}, Strided4{}, Strided4{}};
  return dispatch_logits(dtype, [&](auto tag) {
    for (int64_t p = 0; p < s.N * s.H * s.W; ++p) softmax_forward_pixel<decltype(tag)>(a, p);
    return cudaSuccess;
  });
}

int emu_softmax2d_backward(Shape4 s, int dtype, Strided4 probs, Strided4 gy, Strided4 gx) {
  const SoftmaxArgs a{s, Strided4{}, Strided4{}, probs, gy, gx};
  return dispatch_logits(dtype, [&](auto tag) {
    for (int64_t p = 0; p < s.N * s.H * s.W; ++p) softmax_backward_pixel<decltype(tag)>(a, p);
    return cudaSuccess;
  });
}

int emu_cross_entropy2d_forward(Shape4 s, int dtype, Strided4 x, Strided3 target, const float* weight,
                                int64_t ignore_index, float label_smoothing, float* loss_map, Strided4 grad,
                                float* sums, int64_t* bad) {
  const CrossEntropyArgs a{s, x, target, ignore_index, make_smoothing(label_smoothing, s.C, weight), loss_map, grad};
  const Finalize fin = make_labelled_finalize(2, sums, bad, target, s.H, s.W);
  return dispatch_logits(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (label_smoothing != 0.f) {  // the launcher's choice of instantiation
      run<3>(s.N * s.H * s.W, fin,
             [&](int64_t p, float* acc, int64_t& fb) { cross_entropy_pixel<T, true>(a, p, acc, fb); });
    } else {
      run<3>(s.N * s.H * s.W, fin,
             [&](int64_t p, float* acc, int64_t& fb) { cross_entropy_pixel<T, false>(a, p, acc, fb); });
    }
    return cudaSuccess;
  });
}

int emu_bce_with_logits2d_forward(int64_t N, int64_t H, int64_t W, Strided3 z, Strided3 target, float target_value,
                                  Strided3 mask, float* loss_map, Strided3 grad, float* sums) {
  const BceSegment first{H, W, N * H * W, z, target, mask, grad, target_value, loss_map};
  const BceSegment none{1, 1, 0, Strided3{}, Strided3{}, Strided3{}, Strided3{}, 0.f, nullptr};
  run<4>(first.P, make_finalize(2, sums),
         [&](int64_t q, float* acc, int64_t&) { bce_pair_pixel(first, none, q, acc); });
  return 0;
}

int emu_discriminator_loss_forward(const int64_t* fake_nhw, Strided3 fake, Strided3 fake_mask, Strided3 fake_grad,
                                   const int64_t* real_nhw, Strided3 real, Strided3 real_mask, Strided3 real_grad,
                                   float* sums) {
  const BceSegment first{fake_nhw[1], fake_nhw[2], fake_nhw[0] * fake_nhw[1] * fake_nhw[2], fake, Strided3{},
                         fake_mask, fake_grad, 0.f, nullptr};
  const BceSegment second{real_nhw[1], real_nhw[2], real_nhw[0] * real_nhw[1] * real_nhw[2], real, Strided3{},
                          real_mask, real_grad, 1.f, nullptr};
  run<4>(first.P + second.P, make_finalize(4, sums),
         [&](int64_t q, float* acc, int64_t&) { bce_pair_pixel(first, second, q, acc); });
  return 0;
}

int emu_semi_cross_entropy2d_forward(Shape4 s, int dtype, Strided4 x, Strided3 z, float threshold, Strided3 mask,
                                     float* loss_map, Strided4 grad, float* sums) {
  const SemiArgs a{s, x, z, mask, threshold, loss_map, grad};
  return dispatch_logits(dtype, [&](auto tag) {
    run<3>(s.N * s.H * s.W, make_finalize(3, sums),
           [&](int64_t p, float* acc, int64_t&) { semi_pixel<decltype(tag)>(a, p, acc); });
    return cudaSuccess;
  });
}

int emu_generator_loss_forward(Shape4 s, int dtype, Strided4 x, Strided3 z, Strided3 target, int64_t ignore_index,
                               float threshold, Strided4 grad_x, Strided3 grad_z, float* sums, int64_t* bad) {
  const GeneratorArgs a{s, x, z, target, ignore_index, threshold, grad_x, grad_z};
  const Finalize fin = make_labelled_finalize(6, sums, bad, target, s.H, s.W);
  return dispatch_logits(dtype, [&](auto tag) {
    run<7>(s.N * s.H * s.W, fin,
           [&](int64_t p, float* acc, int64_t& fb) { generator_pixel<decltype(tag)>(a, p, acc, fb); });
    return cudaSuccess;
  });
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

// ------------------------------------------------------------------------------------ fused bilinear upsampling

int emu_softmax2d_upsampled_forward(Shape4 s, int dtype, Strided4 x, Upsample up, Strided4 y) {
  const SoftmaxArgs a{s, x, y, Strided4{}, Strided4{}, Strided4{}};
  const Upsampled place = make_upsampled(up, s.H, s.W);
  return dispatch_logits(dtype, [&](auto tag) {
    for (int64_t p = 0; p < s.N * s.H * s.W; ++p) softmax_forward_pixel<decltype(tag)>(a, p, place);
    return cudaSuccess;
  });
}

int emu_softmax2d_upsampled_backward(Shape4 s, int dtype, Strided4 probs, Strided4 gy, Upsample up, Strided4 gx) {
  const SoftmaxGradArgs a{Shape4{s.N, s.C, up.h, up.w}, s.H, s.W, make_axis(up.h, s.H, up.align_corners),
                          make_axis(up.w, s.W, up.align_corners), probs, gy, gx, static_cast<float*>(up.scratch)};
  return dispatch_logits(dtype, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t p = 0; p < s.N * s.H * s.W; ++p) softmax_dot_pixel<T>(a, p);
    for (int64_t q = 0; q < a.s.N * a.s.C * a.s.H * a.s.W; ++q) softmax_grad_element<T>(a, q);
    return cudaSuccess;
  });
}

int emu_cross_entropy2d_upsampled_forward(Shape4 s, int dtype, Strided4 x, Upsample up, Strided3 target,
                                          const float* weight, int64_t ignore_index, float label_smoothing,
                                          float* loss_map, Strided4 grad, float* sums, int64_t* bad) {
  const Smoothing sm = make_smoothing(label_smoothing, s.C, weight);
  const CrossEntropyArgs a{s, x, target, ignore_index, sm, loss_map, Strided4{}};
  Upsampled place = make_upsampled(up, s.H, s.W);
  if (grad.data == nullptr) place.state = nullptr;
  const Finalize fin = make_labelled_finalize(2, sums, bad, target, s.H, s.W);
  const bool smooth = label_smoothing != 0.f;
  const int err = dispatch_logits(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (smooth) {
      run<3>(s.N * s.H * s.W, fin,
             [&](int64_t p, float* acc, int64_t& fb) { cross_entropy_pixel<T, true>(a, p, acc, fb, place); });
    } else {
      run<3>(s.N * s.H * s.W, fin,
             [&](int64_t p, float* acc, int64_t& fb) { cross_entropy_pixel<T, false>(a, p, acc, fb, place); });
    }
    return cudaSuccess;
  });
  if (err != 0 || grad.data == nullptr) return err;
  return logit_grad(make_logit_grad(s, x, place, grad, sm), dtype, smooth);
}

int emu_semi_cross_entropy2d_upsampled_forward(Shape4 s, int dtype, Strided4 x, Upsample up, Strided3 z,
                                               float threshold, Strided3 mask, float* loss_map, Strided4 grad,
                                               float* sums) {
  const SemiArgs a{s, x, z, mask, threshold, loss_map, Strided4{}};
  Upsampled place = make_upsampled(up, s.H, s.W);
  if (grad.data == nullptr) place.state = nullptr;
  const int err = dispatch_logits(dtype, [&](auto tag) {
    run<3>(s.N * s.H * s.W, make_finalize(3, sums),
           [&](int64_t p, float* acc, int64_t&) { semi_pixel<decltype(tag)>(a, p, acc, place); });
    return cudaSuccess;
  });
  if (err != 0 || grad.data == nullptr) return err;
  return logit_grad(make_logit_grad(s, x, place, grad, no_smoothing()), dtype, false);
}

int emu_generator_loss_upsampled_forward(Shape4 s, int dtype, Strided4 x, Upsample up, Strided3 z, Strided3 target,
                                         int64_t ignore_index, float threshold, Strided4 grad_x, Strided3 grad_z,
                                         float* sums, int64_t* bad) {
  const GeneratorArgs a{s, x, z, target, ignore_index, threshold, Strided4{}, grad_z};
  Upsampled place = make_upsampled(up, s.H, s.W);
  if (grad_x.data == nullptr) place.state = nullptr;
  const Finalize fin = make_labelled_finalize(6, sums, bad, target, s.H, s.W);
  const int err = dispatch_logits(dtype, [&](auto tag) {
    run<7>(s.N * s.H * s.W, fin,
           [&](int64_t p, float* acc, int64_t& fb) { generator_pixel<decltype(tag)>(a, p, acc, fb, place); });
    return cudaSuccess;
  });
  if (err != 0 || grad_x.data == nullptr) return err;
  return logit_grad(make_logit_grad(s, x, place, grad_x, no_smoothing()), dtype, false);
}

// pseudo_label_cross_entropy2d_forward (pseudo_label.cu): the same choice of placements (dispatch_pseudo_label),
// the pixel function over every pixel, then the gather of an upsampled student's gradient.
int emu_pseudo_label_cross_entropy2d_forward(Shape4 s, int dtype, Strided4 x, Upsample x_up, Strided4 teacher,
                                             Upsample teacher_up, Strided3 z, float d_threshold, bool test_confidence,
                                             float confidence_threshold, Strided3 mask, float* loss_map,
                                             Strided4 grad, float* sums) {
  const bool x_at_grid = x_up.h == s.H && x_up.w == s.W;
  if (x_at_grid || grad.data == nullptr) x_up.scratch = nullptr;
  const PseudoLabelArgs a{s, x, teacher, z, mask, d_threshold, Confidence{test_confidence, confidence_threshold},
                          loss_map, x_at_grid ? grad : Strided4{}};
  const int err = dispatch_pseudo_label(s, dtype, x_up, teacher.data != nullptr, teacher_up,
                                        [&](auto tag, const auto& place, const auto& from) {
    run<3>(s.N * s.H * s.W, make_finalize(3, sums), [&](int64_t p, float* acc, int64_t&) {
      pseudo_label_pixel<decltype(tag)>(a, p, acc, place, from);
    });
    return cudaSuccess;
  });
  if (err != 0 || x_at_grid || grad.data == nullptr) return err;
  return logit_grad(make_logit_grad(s, x, make_upsampled(x_up, s.H, s.W), grad, no_smoothing()), dtype, false);
}

int emu_upsample_map(int64_t N, int64_t h, int64_t w, Strided3 z, int64_t H, int64_t W, bool align_corners,
                     float* out) {
  const MapResample a{N, H, W, make_axis(h, H, align_corners), make_axis(w, W, align_corners), z, out};
  for (int64_t p = 0; p < N * H * W; ++p) map_upsample_pixel(a, p);
  return 0;
}

int emu_map_grad_gather(int64_t N, int64_t H, int64_t W, const float* g, int64_t h, int64_t w, bool align_corners,
                        Strided3 out) {
  const MapResample a{N, H, W, make_axis(h, H, align_corners), make_axis(w, W, align_corners), out,
                      const_cast<float*>(g)};
  for (int64_t q = 0; q < N * h * w; ++q) map_grad_element(a, q);
  return 0;
}

}  // extern "C"
