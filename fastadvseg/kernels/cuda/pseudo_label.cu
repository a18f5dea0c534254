// pseudo_label_cross_entropy2d (FixMatch / UniMatch-style confidence-masked self-training): per pixel not
// ignore-masked ("considered"), with t the teacher's logits (the student's own x when there is no teacher),
//   y = argmax_c t (first maximum on ties), conf = 1 / sum_c exp(t_c - max_c t) (float32),
//   keep = conf >= tau (when a tau is given) and sigmoid(float32(z)) > T (when a D map z is given; decided exactly
//          as float32(z) > logit(T), keep_logit_of / keep_pixel in pixel_ops.cuh, the rule of L_semi),
//   nll = logsumexp_c(x) - x_y at kept pixels.
// Raw sums: sums = [sum nll over kept pixels, kept, considered] (+ the per-pixel map, 0 where not kept).
// Gradient of the raw sum, to the student's logits only (t, y and z are constants): softmax(x)_c - [c == y] at
// kept pixels, exactly 0 elsewhere. Without a teacher the one pass over x gives y, conf and the loss; with one, the
// student's logits are read only at pixels whose teacher is confident.
// Each of x and t is either at the label grid (read in place) or bilinearly upsampled to it from its own grid
// (interpolated per pixel in float32, never stored at the label grid; a D map of another grid arrives upsampled
// to a float32 map by upsample_map). An upsampled x keeps 8 bytes of state per pixel for the gather of its
// low-resolution gradient (upsample.cu): a fixed-order sum per element, no atomics.
// Bytes moved (E = bytes per logit, Ez per map element): reads z (Ez per pixel) and the mask (1 byte per pixel) if
// any, the teacher's logits where the D test passes and the student's where the pixel is kept, each once from
// DRAM (E per element; no second read of x without a teacher); writes the gradient at the label grid (E per
// element) or the 8-byte state when requested, 4 bytes per pixel for the loss map, 3 floats per block of workspace.
#include "pixel_ops.cuh"

namespace fastadvseg {
namespace cuda {
namespace {

template <typename T, typename Place, typename Teacher>
__global__ void __launch_bounds__(kThreads) pseudo_label_kernel(PseudoLabelArgs a, Place place, Teacher teacher,
                                                                Workspace ws) {
  float acc[3] = {0.f, 0.f, 0.f};
  FASTADVSEG_PIXEL_LOOP(p, a.s.N * a.s.H * a.s.W) pseudo_label_pixel<T>(a, p, acc, place, teacher);
  block_sums_to_partials<3>(acc, ws.partials, ws.G);
}

}  // namespace

cudaError_t pseudo_label_cross_entropy2d_forward(Shape4 s, int dtype, Strided4 x, Upsample x_up, Strided4 teacher,
                                                 Upsample teacher_up, Strided3 z, float d_threshold,
                                                 bool test_confidence, float confidence_threshold, Strided3 mask,
                                                 float* loss_map, Strided4 grad, void* workspace, float* sums,
                                                 cudaStream_t stream) {
  const bool x_at_grid = x_up.h == s.H && x_up.w == s.W;
  if (x_at_grid || grad.data == nullptr) x_up.scratch = nullptr;
  const PseudoLabelArgs a{s, x, teacher, z, mask, d_threshold, Confidence{test_confidence, confidence_threshold},
                          loss_map, x_at_grid ? grad : Strided4{}};
  const Workspace ws = carve_workspace(workspace, s.N * s.H * s.W, false);
  cudaError_t err = dispatch_pseudo_label(s, dtype, x_up, teacher.data != nullptr, teacher_up,
                                          [&](auto tag, const auto& place, const auto& from) {
    pseudo_label_kernel<decltype(tag)><<<grid_of(ws.G), kThreads, 0, stream>>>(a, place, from, ws);
    return cudaGetLastError();
  });
  err = then_finalize(err, ws, make_finalize(3, sums), stream);
  if (err != cudaSuccess || x_at_grid || grad.data == nullptr) return err;
  return launch_logit_grad(make_logit_grad(s, x, make_upsampled(x_up, s.H, s.W), grad, no_smoothing()), dtype, false,
                           stream);
}

}  // namespace cuda
}  // namespace fastadvseg
