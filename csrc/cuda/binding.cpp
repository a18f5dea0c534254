// Python binding of the CUDA backend (module fastadvseg._cuda_kernels): turns torch tensors into raw pointers,
// sizes and strides, allocates outputs, gradient buffers and partial-sum workspaces through torch's caching
// allocator, and calls the launchers of kernels/cuda/ on torch's current stream of the tensors' device.
// Arguments arrive validated by fastadvseg/_validate.py (shapes, devices, dtypes); the checks here only guard the
// raw-pointer contract. Autograd lives in fastadvseg/backends/cuda.py.
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

at::Tensor scalar(const at::Tensor& like) { return at::empty({}, like.options().dtype(at::kFloat)); }

at::Tensor workspace(const at::Tensor& like, int rows, int64_t pixels) {
  return at::empty({rows * fc::grid_blocks(pixels)}, like.options().dtype(at::kFloat));
}

fc::Outputs outputs(std::initializer_list<at::Tensor*> tensors) {
  fc::Outputs o;
  for (int i = 0; i < fc::kMaxOutputs; ++i) o.p[i] = nullptr;
  int i = 0;
  for (at::Tensor* t : tensors) o.p[i++] = t->data_ptr<float>();
  return o;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace

at::Tensor softmax2d_forward(const at::Tensor& x) {
  check_cuda(x, "logits");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);  // same memory format as x (dense layouts), contiguous otherwise
  check_launch(fc::softmax2d_forward(shape4(x), dtype_code(x), strided4(x), strided4(y), current_stream()),
               "softmax2d_forward");
  return y;
}

// The gradient of softmax2d from the logits x (the probabilities are recomputed in float32) and grad_y.
at::Tensor softmax2d_backward(const at::Tensor& x, const at::Tensor& grad_y) {
  check_cuda(x, "logits");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor gy = grad_y.scalar_type() == x.scalar_type() ? grad_y : grad_y.to(x.scalar_type());
  TORCH_CHECK(gy.sizes() == x.sizes(), "fastadvseg cuda backend: softmax2d gradient shape mismatch");
  at::Tensor gx = at::empty_like(x);
  check_launch(fc::softmax2d_backward(shape4(x), dtype_code(x), strided4(x), strided4(gy), strided4(gx),
                                      current_stream()),
               "softmax2d_backward");
  return gx;
}

// -> [loss (0-dim, or the (N, H, W) map for reduction none), denominator (0-dim), gradient buffer or None]
std::vector<at::Tensor> cross_entropy2d_forward(const at::Tensor& x, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                int64_t reduction, bool need_grad) {
  check_cuda(x, "logits");
  const c10::cuda::CUDAGuard guard(x.device());
  const fc::Shape4 s = shape4(x);
  const int64_t P = s.N * s.H * s.W;
  at::Tensor w;
  if (weight.has_value()) {
    w = weight->to(x.device(), at::kFloat).contiguous();
    TORCH_CHECK(w.numel() == s.C, "fastadvseg cuda backend: weight must have C elements");
  }
  at::Tensor loss_map = reduction == fc::kReduceNone ? at::empty({s.N, s.H, s.W}, x.options().dtype(at::kFloat))
                                                     : at::Tensor();
  at::Tensor grad = need_grad ? at::empty_like(x) : at::Tensor();
  at::Tensor value = scalar(x), den = scalar(x);
  at::Tensor partials = workspace(x, 2, P);
  check_launch(fc::cross_entropy2d_forward(s, dtype_code(x), strided4(x), raw_map(target, at::kLong),
                                           w.defined() ? w.data_ptr<float>() : nullptr, ignore_index,
                                           static_cast<int>(reduction),
                                           loss_map.defined() ? loss_map.data_ptr<float>() : nullptr, strided4(grad),
                                           partials.data_ptr<float>(), outputs({&value, &den}), current_stream()),
               "cross_entropy2d_forward");
  return {loss_map.defined() ? loss_map : value, den, grad};
}

// -> [loss (0-dim or map), denominator, gradient buffer (z's dtype, (N, H, W)) or None]
std::vector<at::Tensor> bce_with_logits2d_forward(const at::Tensor& z, const std::optional<at::Tensor>& target,
                                                  double target_value, const std::optional<at::Tensor>& mask,
                                                  int64_t reduction, bool need_grad) {
  check_cuda(z, "d_logits");
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t N = z.size(0), H = z.size(1), W = z.size(2);
  at::Tensor t;
  if (target.has_value()) {
    t = target->dim() == 0 ? target->expand(z.sizes()) : *target;  // stride-0 broadcast of a 0-dim target
    check_cuda(t, "target");
  }
  at::Tensor loss_map = reduction == fc::kReduceNone ? at::empty({N, H, W}, z.options().dtype(at::kFloat))
                                                     : at::Tensor();
  at::Tensor grad = need_grad ? at::empty({N, H, W}, z.options()) : at::Tensor();
  at::Tensor value = scalar(z), den = scalar(z);
  at::Tensor partials = workspace(z, 4, N * H * W);
  check_launch(fc::bce_with_logits2d_forward(N, H, W, float_map(z), float_map(t), static_cast<float>(target_value),
                                             raw_map(value_or_undefined(mask), at::kBool), static_cast<int>(reduction),
                                             loss_map.defined() ? loss_map.data_ptr<float>() : nullptr,
                                             float_map(grad), partials.data_ptr<float>(), outputs({&value, &den}),
                                             current_stream()),
               "bce_with_logits2d_forward");
  return {loss_map.defined() ? loss_map : value, den, grad};
}

// -> [loss, fake denominator, real denominator, fake gradient buffer or None, real gradient buffer or None]
std::vector<at::Tensor> discriminator_loss_forward(const at::Tensor& fake, const at::Tensor& real,
                                                   const std::optional<at::Tensor>& fake_mask,
                                                   const std::optional<at::Tensor>& real_mask, bool need_fake_grad,
                                                   bool need_real_grad) {
  check_cuda(fake, "d_fake");
  check_cuda(real, "d_real");
  const c10::cuda::CUDAGuard guard(fake.device());
  const int64_t fake_nhw[3] = {fake.size(0), fake.size(1), fake.size(2)};
  const int64_t real_nhw[3] = {real.size(0), real.size(1), real.size(2)};
  at::Tensor fake_grad = need_fake_grad ? at::empty(fake.sizes(), fake.options()) : at::Tensor();
  at::Tensor real_grad = need_real_grad ? at::empty(real.sizes(), real.options()) : at::Tensor();
  at::Tensor loss = scalar(fake), den_fake = scalar(fake), den_real = scalar(fake);
  at::Tensor partials = workspace(fake, 4, fake.numel() + real.numel());
  check_launch(fc::discriminator_loss_forward(fake_nhw, float_map(fake), raw_map(value_or_undefined(fake_mask), at::kBool),
                                              float_map(fake_grad), real_nhw, float_map(real),
                                              raw_map(value_or_undefined(real_mask), at::kBool), float_map(real_grad),
                                              partials.data_ptr<float>(), outputs({&loss, &den_fake, &den_real}),
                                              current_stream()),
               "discriminator_loss_forward");
  return {loss, den_fake, den_real, fake_grad, real_grad};
}

// -> [loss (0-dim or map), denominator, kept ratio, gradient buffer or None]
std::vector<at::Tensor> semi_cross_entropy2d_forward(const at::Tensor& x, const at::Tensor& z, double threshold,
                                                     const std::optional<at::Tensor>& mask, int64_t reduction,
                                                     bool need_grad) {
  check_cuda(x, "logits");
  check_cuda(z, "d_logits");
  const c10::cuda::CUDAGuard guard(x.device());
  const fc::Shape4 s = shape4(x);
  const int64_t P = s.N * s.H * s.W;
  at::Tensor loss_map = reduction == fc::kReduceNone ? at::empty({s.N, s.H, s.W}, x.options().dtype(at::kFloat))
                                                     : at::Tensor();
  at::Tensor grad = need_grad ? at::empty_like(x) : at::Tensor();
  at::Tensor value = scalar(x), den = scalar(x), ratio = scalar(x);
  at::Tensor partials = workspace(x, 3, P);
  check_launch(fc::semi_cross_entropy2d_forward(s, dtype_code(x), strided4(x), float_map(z),
                                                static_cast<float>(threshold),
                                                raw_map(value_or_undefined(mask), at::kBool),
                                                static_cast<int>(reduction),
                                                loss_map.defined() ? loss_map.data_ptr<float>() : nullptr,
                                                strided4(grad), partials.data_ptr<float>(),
                                                outputs({&value, &den, &ratio}), current_stream()),
               "semi_cross_entropy2d_forward");
  return {loss_map.defined() ? loss_map : value, den, ratio, grad};
}

// -> [total, ce, adv, semi, semi_ratio, den_ce, den_adv, den_semi, grad_x buffer or None, grad_z buffer or None]
std::vector<at::Tensor> generator_loss_forward(const at::Tensor& x, const at::Tensor& z,
                                               const std::optional<at::Tensor>& target, double lambda_adv,
                                               double lambda_semi, double threshold, int64_t ignore_index,
                                               bool need_grad_x, bool need_grad_z) {
  check_cuda(x, "logits");
  check_cuda(z, "d_logits");
  const c10::cuda::CUDAGuard guard(x.device());
  const fc::Shape4 s = shape4(x);
  const int64_t P = s.N * s.H * s.W;
  at::Tensor grad_x = need_grad_x ? at::empty_like(x) : at::Tensor();
  at::Tensor grad_z = need_grad_z ? at::empty({s.N, s.H, s.W}, z.options()) : at::Tensor();
  at::Tensor total = scalar(x), ce = scalar(x), adv = scalar(x), semi = scalar(x), ratio = scalar(x);
  at::Tensor den_ce = scalar(x), den_adv = scalar(x), den_semi = scalar(x);
  at::Tensor partials = workspace(x, 6, P);
  check_launch(fc::generator_loss_forward(s, dtype_code(x), strided4(x), float_map(z),
                                          raw_map(value_or_undefined(target), at::kLong), ignore_index, lambda_adv,
                                          lambda_semi, static_cast<float>(threshold), strided4(grad_x),
                                          float_map(grad_z), partials.data_ptr<float>(),
                                          outputs({&total, &ce, &adv, &semi, &ratio, &den_ce, &den_adv, &den_semi}),
                                          current_stream()),
               "generator_loss_forward");
  return {total, ce, adv, semi, ratio, den_ce, den_adv, den_semi, grad_x, grad_z};
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
  check_launch(fc::one_hot2d_forward(shape4(out), raw_map(target, at::kLong), ignore_index, out.data_ptr(),
                                     static_cast<int>(es), bits, current_stream()),
               "one_hot2d_forward");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastadvseg CUDA kernels (see kernels/cuda/launchers.cuh); autograd in fastadvseg/backends/cuda.py";
  m.attr("REDUCTION_NONE") = static_cast<int>(fc::kReduceNone);
  m.attr("REDUCTION_MEAN") = static_cast<int>(fc::kReduceMean);
  m.attr("REDUCTION_SUM") = static_cast<int>(fc::kReduceSum);
  m.def("softmax2d_forward", &softmax2d_forward, "softmax over channels");
  m.def("softmax2d_backward", &softmax2d_backward, "softmax backward from the logits and the output gradient");
  m.def("cross_entropy2d_forward", &cross_entropy2d_forward, "cross entropy: loss, denominator, gradient of the sum");
  m.def("bce_with_logits2d_forward", &bce_with_logits2d_forward, "BCE with logits: loss, denominator, gradient");
  m.def("discriminator_loss_forward", &discriminator_loss_forward, "BCE(fake, 0) + BCE(real, 1) in one launch");
  m.def("semi_cross_entropy2d_forward", &semi_cross_entropy2d_forward, "masked self-training loss");
  m.def("generator_loss_forward", &generator_loss_forward, "fused generator loss");
  m.def("one_hot2d_forward", &one_hot2d_forward, "one-hot of a label map into a preallocated tensor");
}
