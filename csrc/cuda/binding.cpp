// Python binding of the CUDA backend (module fastadvseg._cuda_kernels): turns torch tensors into raw pointers,
// sizes and strides, allocates outputs, gradient buffers and workspaces through torch's caching allocator, and
// calls the launchers of fastadvseg/kernels/cuda/ on torch's current stream of the tensors' device. Nothing synchronises
// with the host (no .item()): bad labels come back as a device tensor.
// The losses return RAW sums (float32 device tensors; see launchers.cuh), loss maps and gradients of the raw
// sums; optional results are None. Means, gradient scaling and autograd live in fastadvseg/backends/cuda.py.
// Arguments arrive checked by the registered ops (fastadvseg/_ops.py: shapes, devices, dtypes); the binding checks
// again what each kernel will read (device, dtype, (N, H, W) against the logits or the label grid, a weight's
// length), so that no call can make a kernel read out of bounds.
// Fused bilinear upsampling: every logit op and D-map op takes `size` (the label grid (H, W), or None) and
// `align_corners`; an input whose grid differs from `size` is the op's input after F.interpolate(x.float(), size,
// mode="bilinear", align_corners), without that tensor: logits go to the *_upsampled launchers, a D map is
// upsampled to a float32 map first and its gradient, computed at (H, W) in float32, is gathered back to its own
// grid (see launchers.cuh). Gradients keep their input's shape and dtype; labels, masks and loss maps are at size. Every pointer is taken from an argument or a local at::Tensor alive until
// the launch is queued; stream order covers the kernel's run after the caching allocator reuses its memory.
// Only the headers used (not torch/extension.h, which pulls in the whole C++ frontend): builds and checks faster.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 (+ stl casters) and torch's Tensor caster

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>
#include <optional>
#include <vector>

#include "launchers.cuh"

namespace fc = fastadvseg::cuda;

namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastadvseg cuda backend: ", op, " failed to launch: ", cudaGetErrorString(err));
}

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return fc::kFloat32;
    case at::kHalf: return fc::kFloat16;
    case at::kBFloat16: return fc::kBFloat16;
    case at::kDouble: return fc::kFloat64;
    default: TORCH_CHECK(false, "fastadvseg cuda backend: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastadvseg cuda backend: ", name, " must be a CUDA tensor");
}

fc::Shape4 shape4(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "fastadvseg cuda backend: expected an (N, C, H, W) tensor");
  return fc::Shape4{x.size(0), x.size(1), x.size(2), x.size(3)};
}

fc::Strided4 strided4(const at::Tensor& t) {
  if (!t.defined()) return fc::Strided4{nullptr, 0, 0, 0, 0};
  return fc::Strided4{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// A float map (N, H, W) with its dtype code; undefined -> absent.
fc::Strided3 float_map(const at::Tensor& t) {
  if (!t.defined()) return fc::Strided3{nullptr, 0, 0, 0, fc::kFloat32};
  TORCH_CHECK(t.dim() == 3, "fastadvseg cuda backend: expected an (N, H, W) map");
  return fc::Strided3{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), dtype_code(t)};
}

// An int64 label map or a bool mask (N, H, W); undefined -> absent.
fc::Strided3 raw_map(const at::Tensor& t, at::ScalarType expected) {
  if (!t.defined()) return fc::Strided3{nullptr, 0, 0, 0, -1};
  TORCH_CHECK(t.dim() == 3 && t.scalar_type() == expected, "fastadvseg cuda backend: expected an (N, H, W) ",
              expected, " map, got ", t.scalar_type(), " of dim ", t.dim());
  check_cuda(t, "map");
  return fc::Strided3{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), -1};
}

at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// An (N, H, W) map (labels, D's logits, a mask, a BCE target) must be the shape the kernel indexes it with, on the
// device of the launch: the kernels read it at every pixel of the logits.
const at::Tensor& nhw_map(const at::Tensor& t, int64_t N, int64_t H, int64_t W, const char* name) {
  if (!t.defined()) return t;
  check_cuda(t, name);
  TORCH_CHECK(t.dim() == 3 && t.size(0) == N && t.size(1) == H && t.size(2) == W, "fastadvseg cuda backend: ", name,
              " ", t.sizes(), " does not match (N, H, W) = (", N, ", ", H, ", ", W, ")");
  return t;
}

// The K raw sums (float32) and the bad-label report [count, first value] (int64) of a loss.
at::Tensor sums_of(const at::Tensor& like, int64_t K) { return at::empty({K}, like.options().dtype(at::kFloat)); }
at::Tensor bad_report(const at::Tensor& like) { return at::empty({2}, like.options().dtype(at::kLong)); }

// The workspace of a loss with K sums over `pixels` pixels (fc::workspace_bytes), as int64 for alignment.
at::Tensor workspace(const at::Tensor& like, int K, int64_t pixels, bool labelled) {
  return at::empty({(fc::workspace_bytes(pixels, K, labelled) + 7) / 8}, like.options().dtype(at::kLong));
}

// The (N, H, W) float32 loss map when requested, else undefined.
at::Tensor loss_map_if(bool need_map, const at::Tensor& like, int64_t N, int64_t H, int64_t W) {
  return need_map ? at::empty({N, H, W}, like.options().dtype(at::kFloat)) : at::Tensor();
}

float* float_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The label grid of an op: `size` when given (two positive ints), else the (H, W) of its first input.
struct Grid {
  int64_t H, W;
};

Grid label_grid(const std::optional<std::vector<int64_t>>& size, int64_t H, int64_t W) {
  if (!size.has_value()) return Grid{H, W};
  TORCH_CHECK_VALUE(size->size() == 2 && (*size)[0] > 0 && (*size)[1] > 0,
                    "fastadvseg cuda backend: size must be two positive ints (H, W), got ", c10::IntArrayRef(*size));
  return Grid{(*size)[0], (*size)[1]};
}

// Whether a tensor whose last two dimensions are (h, w) is resampled to the grid (an input at the grid is used
// as is); one that is must have pixels to interpolate from.
bool resampled(const at::Tensor& t, const Grid& g, const char* name) {
  const int64_t h = t.size(t.dim() - 2), w = t.size(t.dim() - 1);
  if (h == g.H && w == g.W) return false;
  TORCH_CHECK_VALUE(h > 0 && w > 0, "fastadvseg cuda backend: cannot upsample ", name, " ", t.sizes(), " to (", g.H,
                    ", ", g.W, "): it has no pixels");
  return true;
}

// The gather's scratch of an upsampled loss (fc::kLogitStateBytes per label-grid pixel), when a gradient is due.
at::Tensor logit_state(bool need, const at::Tensor& like, int64_t pixels) {
  static_assert(fc::kLogitStateBytes == 8, "one int64 per pixel");
  return need ? at::empty({pixels}, like.options().dtype(at::kLong)) : at::Tensor();
}

fc::Upsample upsample_of(const at::Tensor& x, bool align_corners, const at::Tensor& scratch) {
  TORCH_CHECK_VALUE(x.size(1) < (int64_t{1} << 31), "fastadvseg cuda backend: upsampled logits need C < 2**31, got ",
                    x.size(1));
  return fc::Upsample{x.size(2), x.size(3), align_corners, scratch.defined() ? scratch.data_ptr() : nullptr};
}

using OptSize = std::optional<std::vector<int64_t>>;

// A D map (N, h, w) at the label grid g of an op with `size`: itself when it is there already or when there is no
// size (then the kernel's shape check applies), else upsampled to a float32 (N, H, W) map.
at::Tensor map_at(const at::Tensor& z, const OptSize& size, const Grid& g, bool align_corners, const char* name) {
  if (!size.has_value() || !resampled(z, g, name)) return z;
  at::Tensor full = at::empty({z.size(0), g.H, g.W}, z.options().dtype(at::kFloat));
  check_launch(fc::upsample_map(z.size(0), z.size(1), z.size(2), float_map(z), g.H, g.W, align_corners,
                                full.data_ptr<float>(), current_stream()),
               "upsample_map");
  return full;
}

// The gradient buffer of a D map: in its dtype at its grid, or float32 at the grid when it is resampled (then
// gather_map_grad reduces it to the map's grid).
at::Tensor map_grad_buffer(bool need, const at::Tensor& z, const at::Tensor& z_at_grid) {
  if (!need) return at::Tensor();
  return z_at_grid.is_same(z) ? at::empty(z.sizes(), z.options()) : at::empty_like(z_at_grid);
}

at::Tensor gather_map_grad(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& z_at_grid,
                           bool align_corners) {
  if (!grad.defined() || z_at_grid.is_same(z)) return grad;
  at::Tensor out = at::empty(z.sizes(), z.options());
  check_launch(fc::map_grad_gather(grad.size(0), grad.size(1), grad.size(2), grad.data_ptr<float>(), z.size(1),
                                   z.size(2), align_corners, float_map(out), current_stream()),
               "map_grad_gather");
  return out;
}

}  // namespace

at::Tensor softmax2d_forward(const at::Tensor& x, const OptSize& size, bool align_corners) {
  check_cuda(x, "logits");
  const c10::cuda::CUDAGuard guard(x.device());
  const fc::Shape4 s = shape4(x);
  const Grid g = label_grid(size, s.H, s.W);
  if (resampled(x, g, "logits")) {
    at::Tensor y = at::empty({s.N, s.C, g.H, g.W}, x.options().memory_format(x.suggest_memory_format()));
    check_launch(fc::softmax2d_upsampled_forward(fc::Shape4{s.N, s.C, g.H, g.W}, dtype_code(x), strided4(x),
                                                 upsample_of(x, align_corners, at::Tensor()), strided4(y),
                                                 current_stream()),
                 "softmax2d_upsampled_forward");
    return y;
  }
  at::Tensor y = at::empty_like(x);  // same memory format as x (dense layouts), contiguous otherwise
  check_launch(fc::softmax2d_forward(s, dtype_code(x), strided4(x), strided4(y), current_stream()),
               "softmax2d_forward");
  return y;
}

// The gradient of softmax2d from the saved probabilities (softmax2d_forward's output) and grad_probs:
// gx = p * (gy - sum_c p*gy) in float32 math, in p's dtype; with low_size (the logits' (h, w) when they were
// upsampled), that gradient's adjoint through the upsampling, at (N, C, h, w).
at::Tensor softmax2d_backward(const at::Tensor& probs, const at::Tensor& grad_probs, const OptSize& low_size,
                              bool align_corners) {
  check_cuda(probs, "probabilities");
  const c10::cuda::CUDAGuard guard(probs.device());
  const at::Tensor gy = grad_probs.scalar_type() == probs.scalar_type() ? grad_probs
                                                                         : grad_probs.to(probs.scalar_type());
  TORCH_CHECK(gy.sizes() == probs.sizes(), "fastadvseg cuda backend: softmax2d gradient shape mismatch");
  const fc::Shape4 s = shape4(probs);
  const Grid low = label_grid(low_size, s.H, s.W);
  if (low.H != s.H || low.W != s.W) {
    TORCH_CHECK_VALUE(s.H > 0 && s.W > 0, "fastadvseg cuda backend: probabilities ", probs.sizes(),
                      " have no pixels to take a gradient at low_size from");
    at::Tensor gx = at::empty({s.N, s.C, low.H, low.W}, probs.options().memory_format(probs.suggest_memory_format()));
    at::Tensor dot = at::empty({s.N, s.H, s.W}, probs.options().dtype(at::kFloat));
    check_launch(fc::softmax2d_upsampled_backward(s, dtype_code(probs), strided4(probs), strided4(gy),
                                                  fc::Upsample{low.H, low.W, align_corners, dot.data_ptr()},
                                                  strided4(gx), current_stream()),
                 "softmax2d_upsampled_backward");
    return gx;
  }
  at::Tensor gx = at::empty_like(probs);
  check_launch(fc::softmax2d_backward(shape4(probs), dtype_code(probs), strided4(probs), strided4(gy), strided4(gx),
                                      current_stream()),
               "softmax2d_backward");
  return gx;
}

// -> [sums (2,) = [loss sum, weight sum], loss map (N, H, W) or None, gradient of the loss sum (like x) or None,
//     bad (2,) int64 = [bad label count, first bad label value or 0]]
std::vector<at::Tensor> cross_entropy2d_forward(const at::Tensor& x, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                double label_smoothing, bool need_map, bool need_grad,
                                                const OptSize& size, bool align_corners) {
  check_cuda(x, "logits");
  const c10::cuda::CUDAGuard guard(x.device());
  const fc::Shape4 x_shape = shape4(x);
  const Grid g = label_grid(size, x_shape.H, x_shape.W);
  const fc::Shape4 s{x_shape.N, x_shape.C, g.H, g.W};  // the label grid
  const int64_t P = s.N * s.H * s.W;
  at::Tensor w;
  if (weight.has_value()) {
    w = weight->to(x.device(), at::kFloat).contiguous();
    TORCH_CHECK(w.numel() == s.C, "fastadvseg cuda backend: weight must have C elements");
  }
  const fc::Strided3 t = raw_map(nhw_map(target, s.N, s.H, s.W, "target"), at::kLong);
  at::Tensor loss_map = loss_map_if(need_map, x, s.N, s.H, s.W);
  at::Tensor grad = need_grad ? at::empty_like(x) : at::Tensor();
  at::Tensor sums = sums_of(x, 2), bad = bad_report(x);
  at::Tensor ws = workspace(x, 2, P, true);
  if (resampled(x, g, "logits")) {
    const at::Tensor state = logit_state(need_grad, x, P);
    check_launch(fc::cross_entropy2d_upsampled_forward(s, dtype_code(x), strided4(x), upsample_of(x, align_corners, state),
                                                       t, float_ptr(w), ignore_index,
                                                       static_cast<float>(label_smoothing), float_ptr(loss_map),
                                                       strided4(grad), ws.data_ptr(), sums.data_ptr<float>(),
                                                       bad.data_ptr<int64_t>(), current_stream()),
                 "cross_entropy2d_upsampled_forward");
    return {sums, loss_map, grad, bad};
  }
  check_launch(fc::cross_entropy2d_forward(s, dtype_code(x), strided4(x), t, float_ptr(w), ignore_index,
                                           static_cast<float>(label_smoothing), float_ptr(loss_map),
                                           strided4(grad), ws.data_ptr(), sums.data_ptr<float>(),
                                           bad.data_ptr<int64_t>(), current_stream()),
               "cross_entropy2d_forward");
  return {sums, loss_map, grad, bad};
}

// -> [sums (2,) = [loss sum, counted pixels], loss map or None, gradient (z's dtype, (N, H, W)) or None]
std::vector<at::Tensor> bce_with_logits2d_forward(const at::Tensor& z, const std::optional<at::Tensor>& target,
                                                  double target_value, const std::optional<at::Tensor>& mask,
                                                  bool need_map, bool need_grad, const OptSize& size,
                                                  bool align_corners) {
  check_cuda(z, "d_logits");
  TORCH_CHECK(z.dim() == 3, "fastadvseg cuda backend: expected an (N, H, W) map");
  const c10::cuda::CUDAGuard guard(z.device());
  const Grid g = label_grid(size, z.size(1), z.size(2));
  const int64_t N = z.size(0), H = g.H, W = g.W;
  at::Tensor t;
  if (target.has_value()) {
    t = target->dim() == 0 ? target->expand({N, H, W}) : *target;  // stride-0 broadcast of a 0-dim target
    check_cuda(t, "target");
  }
  const at::Tensor zg = map_at(z, size, g, align_corners, "d_logits");
  at::Tensor loss_map = loss_map_if(need_map, z, N, H, W);
  at::Tensor grad = map_grad_buffer(need_grad, z, zg);
  at::Tensor sums = sums_of(z, 2);
  at::Tensor ws = workspace(z, 4, N * H * W, false);
  check_launch(fc::bce_with_logits2d_forward(N, H, W, float_map(zg), float_map(nhw_map(t, N, H, W, "target")),
                                             static_cast<float>(target_value),
                                             raw_map(nhw_map(value_or_undefined(mask), N, H, W, "ignore_mask"), at::kBool),
                                             float_ptr(loss_map),
                                             float_map(grad), ws.data_ptr(), sums.data_ptr<float>(), current_stream()),
               "bce_with_logits2d_forward");
  return {sums, loss_map, gather_map_grad(grad, z, zg, align_corners)};
}

// -> [sums (3,) = [loss sum over kept pixels, kept, considered], loss map or None, gradient (like x) or None]
std::vector<at::Tensor> semi_cross_entropy2d_forward(const at::Tensor& x, const at::Tensor& z, double threshold,
                                                     const std::optional<at::Tensor>& mask, bool need_map,
                                                     bool need_grad, const OptSize& size, bool align_corners) {
  check_cuda(x, "logits");
  check_cuda(z, "d_logits");
  const c10::cuda::CUDAGuard guard(x.device());
  const fc::Shape4 x_shape = shape4(x);
  const Grid g = label_grid(size, x_shape.H, x_shape.W);
  const fc::Shape4 s{x_shape.N, x_shape.C, g.H, g.W};  // the label grid
  TORCH_CHECK_VALUE(!size.has_value() || (z.dim() == 3 && z.size(0) == s.N), "fastadvseg cuda backend: d_logits ",
                    z.sizes(), " does not match the logits' N = ", s.N);
  const at::Tensor zg = nhw_map(map_at(z, size, g, align_corners, "d_logits"), s.N, s.H, s.W, "d_logits");
  const fc::Strided3 m = raw_map(nhw_map(value_or_undefined(mask), s.N, s.H, s.W, "ignore_mask"), at::kBool);
  at::Tensor loss_map = loss_map_if(need_map, x, s.N, s.H, s.W);
  at::Tensor grad = need_grad ? at::empty_like(x) : at::Tensor();
  at::Tensor sums = sums_of(x, 3);
  at::Tensor ws = workspace(x, 3, s.N * s.H * s.W, false);
  if (resampled(x, g, "logits")) {
    const at::Tensor state = logit_state(need_grad, x, s.N * s.H * s.W);
    check_launch(fc::semi_cross_entropy2d_upsampled_forward(s, dtype_code(x), strided4(x),
                                                            upsample_of(x, align_corners, state), float_map(zg),
                                                            static_cast<float>(threshold), m, float_ptr(loss_map),
                                                            strided4(grad), ws.data_ptr(), sums.data_ptr<float>(),
                                                            current_stream()),
                 "semi_cross_entropy2d_upsampled_forward");
    return {sums, loss_map, grad};
  }
  check_launch(fc::semi_cross_entropy2d_forward(s, dtype_code(x), strided4(x), float_map(zg), static_cast<float>(threshold), m,
                                                float_ptr(loss_map), strided4(grad), ws.data_ptr(),
                                                sums.data_ptr<float>(), current_stream()),
               "semi_cross_entropy2d_forward");
  return {sums, loss_map, grad};
}

// -> [sums (3,) = [loss sum over kept pixels, kept, considered], loss map or None, gradient (like x) or None]
// teacher: None (x's own argmax and confidence, x read once) or (N, C, ht, wt) of x's dtype; z: None or (N, hd, wd)
// of any float dtype; confidence_threshold: None (no confidence test) or tau. With size, each of x, the teacher
// and z is upsampled to it from its own grid where that differs (z to a float32 map first, as in semi).
std::vector<at::Tensor> pseudo_label_cross_entropy2d_forward(const at::Tensor& x,
                                                             const std::optional<at::Tensor>& teacher,
                                                             const std::optional<at::Tensor>& z,
                                                             std::optional<double> confidence_threshold,
                                                             double d_threshold,
                                                             const std::optional<at::Tensor>& mask, bool need_map,
                                                             bool need_grad, const OptSize& size, bool align_corners) {
  check_cuda(x, "logits");
  const c10::cuda::CUDAGuard guard(x.device());
  const fc::Shape4 x_shape = shape4(x);
  const Grid g = label_grid(size, x_shape.H, x_shape.W);
  const fc::Shape4 s{x_shape.N, x_shape.C, g.H, g.W};  // the label grid
  const at::Tensor t = value_or_undefined(teacher);
  if (t.defined()) {
    check_cuda(t, "teacher_logits");
    TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == s.N && t.size(1) == s.C && t.scalar_type() == x.scalar_type(),
                      "fastadvseg cuda backend: teacher_logits ", t.sizes(), " ", t.scalar_type(),
                      " does not match the logits' N = ", s.N, ", C = ", s.C, " and dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(size.has_value() || (t.size(2) == s.H && t.size(3) == s.W), "fastadvseg cuda backend: "
                      "teacher_logits ", t.sizes(), " must be at the logits' grid (", s.H, ", ", s.W, ") without size");
    if (size.has_value()) resampled(t, g, "teacher_logits");  // an upsampled teacher must have pixels
  }
  at::Tensor zg;
  if (z.has_value()) {
    check_cuda(*z, "d_logits");
    TORCH_CHECK_VALUE(z->dim() == 3 && z->size(0) == s.N, "fastadvseg cuda backend: d_logits ", z->sizes(),
                      " does not match the logits' N = ", s.N);
    zg = nhw_map(map_at(*z, size, g, align_corners, "d_logits"), s.N, s.H, s.W, "d_logits");
  }
  const fc::Strided3 m = raw_map(nhw_map(value_or_undefined(mask), s.N, s.H, s.W, "ignore_mask"), at::kBool);
  at::Tensor loss_map = loss_map_if(need_map, x, s.N, s.H, s.W);
  at::Tensor grad = need_grad ? at::empty_like(x) : at::Tensor();
  at::Tensor sums = sums_of(x, 3);
  at::Tensor ws = workspace(x, 3, s.N * s.H * s.W, false);
  const bool x_resampled = resampled(x, g, "logits");
  const at::Tensor state = logit_state(need_grad && x_resampled, x, s.N * s.H * s.W);
  const fc::Upsample t_up = t.defined() ? upsample_of(t, align_corners, at::Tensor())
                                        : fc::Upsample{s.H, s.W, align_corners, nullptr};
  check_launch(fc::pseudo_label_cross_entropy2d_forward(
                   s, dtype_code(x), strided4(x), upsample_of(x, align_corners, state), strided4(t), t_up,
                   float_map(zg), static_cast<float>(d_threshold), confidence_threshold.has_value(),
                   static_cast<float>(confidence_threshold.value_or(0.0)), m, float_ptr(loss_map), strided4(grad),
                   ws.data_ptr(), sums.data_ptr<float>(), current_stream()),
               "pseudo_label_cross_entropy2d_forward");
  return {sums, loss_map, grad};
}

// -> [sums (6,) = [term sum, term count, adv sum, adv count, kept, considered], grad_x = d(term sum)/dx or None,
//     grad_z = d(adv sum)/dz (z's dtype, (N, H, W)) or None, bad (2,) int64 ([0, 0] when unlabelled)]
std::vector<at::Tensor> generator_loss_forward(const at::Tensor& x, const at::Tensor& z,
                                               const std::optional<at::Tensor>& target, double threshold,
                                               int64_t ignore_index, bool need_grad_x, bool need_grad_z,
                                               const OptSize& size, bool align_corners) {
  check_cuda(x, "logits");
  check_cuda(z, "d_logits");
  const c10::cuda::CUDAGuard guard(x.device());
  const fc::Shape4 x_shape = shape4(x);
  const Grid g = label_grid(size, x_shape.H, x_shape.W);
  const fc::Shape4 s{x_shape.N, x_shape.C, g.H, g.W};  // the label grid
  TORCH_CHECK_VALUE(!size.has_value() || (z.dim() == 3 && z.size(0) == s.N), "fastadvseg cuda backend: d_logits ",
                    z.sizes(), " does not match the logits' N = ", s.N);
  const at::Tensor zg = nhw_map(map_at(z, size, g, align_corners, "d_logits"), s.N, s.H, s.W, "d_logits");
  const fc::Strided3 t = raw_map(nhw_map(value_or_undefined(target), s.N, s.H, s.W, "target"), at::kLong);
  at::Tensor grad_x = need_grad_x ? at::empty_like(x) : at::Tensor();
  at::Tensor grad_z = map_grad_buffer(need_grad_z, z, zg);
  at::Tensor sums = sums_of(x, 6), bad = bad_report(x);
  at::Tensor ws = workspace(x, 6, s.N * s.H * s.W, true);
  if (resampled(x, g, "logits")) {
    const at::Tensor state = logit_state(need_grad_x, x, s.N * s.H * s.W);
    check_launch(fc::generator_loss_upsampled_forward(s, dtype_code(x), strided4(x), upsample_of(x, align_corners, state),
                                                      float_map(zg), t, ignore_index, static_cast<float>(threshold),
                                                      strided4(grad_x), float_map(grad_z), ws.data_ptr(),
                                                      sums.data_ptr<float>(), bad.data_ptr<int64_t>(),
                                                      current_stream()),
                 "generator_loss_upsampled_forward");
  } else {
    check_launch(fc::generator_loss_forward(s, dtype_code(x), strided4(x), float_map(zg), t, ignore_index,
                                            static_cast<float>(threshold), strided4(grad_x), float_map(grad_z),
                                            ws.data_ptr(), sums.data_ptr<float>(), bad.data_ptr<int64_t>(),
                                            current_stream()),
                 "generator_loss_forward");
  }
  return {sums, grad_x, gather_map_grad(grad_z, z, zg, align_corners), bad};
}

// -> [sums (4,) = [fake sum, fake count, real sum, real count], fake gradient or None, real gradient or None]
std::vector<at::Tensor> discriminator_loss_forward(const at::Tensor& fake, const at::Tensor& real,
                                                   const std::optional<at::Tensor>& fake_mask,
                                                   const std::optional<at::Tensor>& real_mask, bool need_fake_grad,
                                                   bool need_real_grad, const OptSize& size, bool align_corners) {
  check_cuda(fake, "d_fake");
  check_cuda(real, "d_real");
  TORCH_CHECK(fake.dim() == 3 && real.dim() == 3, "fastadvseg cuda backend: expected (N, H, W) maps");
  const c10::cuda::CUDAGuard guard(fake.device());
  // without size each map is at its own grid; with size both are at that one
  const at::Tensor fg = map_at(fake, size, label_grid(size, 0, 0), align_corners, "d_fake");
  const at::Tensor rg = map_at(real, size, label_grid(size, 0, 0), align_corners, "d_real");
  const int64_t fake_nhw[3] = {fg.size(0), fg.size(1), fg.size(2)};
  const int64_t real_nhw[3] = {rg.size(0), rg.size(1), rg.size(2)};
  at::Tensor fake_grad = map_grad_buffer(need_fake_grad, fake, fg);
  at::Tensor real_grad = map_grad_buffer(need_real_grad, real, rg);
  at::Tensor sums = sums_of(fake, 4);
  at::Tensor ws = workspace(fake, 4, fg.numel() + rg.numel(), false);
  const at::Tensor fm = nhw_map(value_or_undefined(fake_mask), fake_nhw[0], fake_nhw[1], fake_nhw[2], "ignore_mask_fake");
  const at::Tensor rm = nhw_map(value_or_undefined(real_mask), real_nhw[0], real_nhw[1], real_nhw[2], "ignore_mask_real");
  check_launch(fc::discriminator_loss_forward(fake_nhw, float_map(fg), raw_map(fm, at::kBool),
                                              float_map(fake_grad), real_nhw, float_map(rg),
                                              raw_map(rm, at::kBool), float_map(real_grad),
                                              ws.data_ptr(), sums.data_ptr<float>(), current_stream()),
               "discriminator_loss_forward");
  return {sums, gather_map_grad(fake_grad, fake, fg, align_corners), gather_map_grad(real_grad, real, rg, align_corners)};
}

// Fills `out`, a contiguous (N, C, H, W) tensor of a 1/2/4/8-byte dtype, with the one-hot of `target`.
void one_hot2d_forward(const at::Tensor& target, const at::Tensor& out, int64_t ignore_index) {
  check_cuda(out, "output");
  const c10::cuda::CUDAGuard guard(out.device());
  TORCH_CHECK(out.dim() == 4 && out.is_contiguous(), "fastadvseg cuda backend: one_hot2d output must be contiguous NCHW");
  const int64_t es = out.element_size();
  TORCH_CHECK(es == 1 || es == 2 || es == 4 || es == 8, "fastadvseg cuda backend: one_hot2d element size ", es);
  const at::Tensor one = at::ones({}, at::TensorOptions().dtype(out.scalar_type()).device(at::kCPU));
  uint64_t bits = 0;
  std::memcpy(&bits, one.data_ptr(), static_cast<size_t>(es));  // little-endian: the low es bytes
  check_launch(fc::one_hot2d_forward(shape4(out), raw_map(nhw_map(target, out.size(0), out.size(2), out.size(3), "target"),
                                                          at::kLong),
                                     ignore_index, out.data_ptr(),
                                     static_cast<int>(es), bits, current_stream()),
               "one_hot2d_forward");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "fastadvseg CUDA kernels (raw sums, see fastadvseg/kernels/cuda/launchers.cuh); autograd: fastadvseg/backends/cuda.py";
  // size: the label grid (H, W) the inputs of another grid are bilinearly upsampled to (None: none)
  const auto size = py::arg("size") = py::none();
  const auto align_corners = py::arg("align_corners") = false;
  m.def("softmax2d_forward", &softmax2d_forward, "softmax over channels (of the logits upsampled to size, if given)",
        py::arg("x"), size, align_corners);
  m.def("softmax2d_backward", &softmax2d_backward,
        "softmax backward from the saved probabilities and their gradient (at low_size, if given)", py::arg("probs"),
        py::arg("grad_probs"), py::arg("low_size") = py::none(), align_corners);
  m.def("cross_entropy2d_forward", &cross_entropy2d_forward,
        "cross entropy (weights, ignore_index, label smoothing): [loss sum, weight sum], map, gradient, bad labels",
        py::arg("x"), py::arg("target"), py::arg("weight"), py::arg("ignore_index"), py::arg("label_smoothing"),
        py::arg("need_map"), py::arg("need_grad"), size, align_corners);
  m.def("bce_with_logits2d_forward", &bce_with_logits2d_forward, "BCE with logits: [loss sum, count], map, gradient",
        py::arg("z"), py::arg("target"), py::arg("target_value"), py::arg("mask"), py::arg("need_map"),
        py::arg("need_grad"), size, align_corners);
  m.def("semi_cross_entropy2d_forward", &semi_cross_entropy2d_forward,
        "masked self-training loss: [loss sum, kept, considered], map, gradient", py::arg("x"), py::arg("z"),
        py::arg("threshold"), py::arg("mask"), py::arg("need_map"), py::arg("need_grad"), size, align_corners);
  m.def("pseudo_label_cross_entropy2d_forward", &pseudo_label_cross_entropy2d_forward,
        "confidence-masked pseudo-label loss: [loss sum, kept, considered], map, gradient", py::arg("x"),
        py::arg("teacher"), py::arg("z"), py::arg("confidence_threshold"), py::arg("d_threshold"), py::arg("mask"),
        py::arg("need_map"), py::arg("need_grad"), size, align_corners);
  m.def("generator_loss_forward", &generator_loss_forward,
        "generator loss terms: [term, term count, adv, adv count, kept, considered], gradients, bad labels",
        py::arg("x"), py::arg("z"), py::arg("target"), py::arg("threshold"), py::arg("ignore_index"),
        py::arg("need_grad_x"), py::arg("need_grad_z"), size, align_corners);
  m.def("discriminator_loss_forward", &discriminator_loss_forward,
        "BCE(fake, 0) and BCE(real, 1) in one launch: [fake sum, fake count, real sum, real count], gradients",
        py::arg("fake"), py::arg("real"), py::arg("fake_mask"), py::arg("real_mask"), py::arg("need_fake_grad"),
        py::arg("need_real_grad"), size, align_corners);
  m.def("one_hot2d_forward", &one_hot2d_forward, "one-hot of a label map into a preallocated tensor");
}
