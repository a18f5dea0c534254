// Python bindings of the cpu backend's kernels (module fastadvseg._C_cpu).
//
// Plain pybind11, no torch headers. The binding receives the torch tensors themselves, never their addresses as
// integers: the call's own arguments hold a reference to every tensor until the binding returns, after the kernel
// has finished, so no memory a kernel reads or writes can be freed during the launch (a temporary converted
// inline by the caller, `f(t.float())`, lives as long as the call). Each tensor is read through its Python
// interface (data_ptr, dtype, shape, stride, is_cpu) and checked against what the kernel will touch: device,
// dtype, dimensions, shape against the logits (or, for a launch that resizes its inputs, the maps against the full
// resolution `size` and the gradients against their low-resolution inputs), a weight's length, outputs
// non-overlapping. A bad argument is a TypeError or ValueError naming it, never an out-of-bounds access. The GIL is
// released while a kernel runs, after the checks.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "dtypes.h"
#include "kernels.h"

namespace py = pybind11;
using Sizes = std::vector<int64_t>;

namespace {

// torch objects the checks compare against, looked up once when the module is imported. Never freed: they must
// outlive every call, and destroying Python objects at interpreter exit is not safe.
struct TorchObjects {
  py::object tensor, float32, float16, bfloat16, int64, boolean;
};
TorchObjects* torch_objects = nullptr;

std::string str(const Sizes& s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

// A tensor argument as read from Python. `t` is borrowed from the call's arguments (see the header comment).
struct Arg {
  const char* name = "";
  bool present = false;
  void* ptr = nullptr;
  py::object dtype;
  Sizes sizes, strides;

  bool is(const py::object& d) const { return dtype.is(d); }
  std::string dtype_name() const { return py::str(dtype); }
  int64_t numel() const { return std::accumulate(sizes.begin(), sizes.end(), int64_t{1}, std::multiplies<>()); }
};

Arg read(py::handle t, const char* name, bool optional = true) {
  Arg a;
  a.name = name;
  if (t.is_none()) {
    if (!optional) throw py::type_error(std::string(name) + " is required, got None");
    return a;
  }
  if (!py::isinstance(t, torch_objects->tensor))
    throw py::type_error(std::string(name) + " must be a torch.Tensor, got " +
                         std::string(py::str(py::type::handle_of(t).attr("__name__"))));
  if (!t.attr("is_cpu").cast<bool>())
    throw py::value_error(std::string(name) + " must be a CPU tensor for the cpu backend, got one on " +
                          std::string(py::str(t.attr("device"))));
  a.present = true;
  a.dtype = t.attr("dtype");
  a.sizes = t.attr("shape").cast<Sizes>();
  a.strides = t.attr("stride")().cast<Sizes>();
  a.ptr = reinterpret_cast<void*>(t.attr("data_ptr")().cast<intptr_t>());
  if (a.numel() > 0 && !a.ptr) throw py::value_error(std::string(name) + " has no data");
  return a;
}

void expect_dtype(const Arg& a, const py::object& d, const char* what) {
  if (!a.is(d)) throw py::type_error(std::string(a.name) + " must be " + what + ", got " + a.dtype_name());
}

void expect_shape(const Arg& a, const Sizes& shape, const char* against) {
  if (a.sizes != shape)
    throw py::value_error(std::string(a.name) + " " + str(a.sizes) + " does not match " + against + ": need " +
                          str(shape));
}

// Outputs are written by every thread at their own pixels: no two indices may reach one element (no stride 0, no
// strides that alias). Sorted by stride, each dimension must step past everything the faster ones reach; padded
// views (a slice of a larger buffer) are fine.
void expect_non_overlapping(const Arg& a) {
  std::vector<size_t> order(a.sizes.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t i, size_t j) { return a.strides[i] < a.strides[j]; });
  int64_t reach = 0;  // the largest offset the faster dimensions reach
  for (size_t i : order) {
    if (a.sizes[i] == 1) continue;
    if (a.strides[i] <= reach)
      throw py::value_error(std::string(a.name) + " (an output) must not overlap itself, got strides " +
                            str(a.strides) + " for shape " + str(a.sizes));
    reach += a.strides[i] * (a.sizes[i] - 1);
  }
}

void expect_contiguous(const Arg& a) {
  int64_t expected = 1;
  for (size_t i = a.sizes.size(); i-- > 0;) {
    if (a.sizes[i] != 1 && a.strides[i] != expected)
      throw py::value_error(std::string(a.name) + " must be contiguous, got strides " + str(a.strides) +
                            " for shape " + str(a.sizes));
    expected *= a.sizes[i];
  }
}

int float_code(const Arg& a) {
  if (a.is(torch_objects->float32)) return fas::kFloat32;
  if (a.is(torch_objects->float16)) return fas::kFloat16;
  if (a.is(torch_objects->bfloat16)) return fas::kBFloat16;
  throw py::type_error(std::string(a.name) + " must be float32, float16 or bfloat16 for the cpu backend, got " +
                       a.dtype_name());
}

fas::Tensor4 tensor4(const Arg& a) {
  fas::Tensor4 t;
  if (!a.present) return t;
  t.ptr = a.ptr;
  t.dtype = float_code(a);
  t.sN = a.strides[0];
  t.sC = a.strides[1];
  t.sH = a.strides[2];
  t.sW = a.strides[3];
  return t;
}

// The logits (or a tensor of their shape): 4-D float, the sizes every other argument is checked against.
Arg logits(py::handle t, const char* name) {
  Arg a = read(t, name, false);
  if (a.sizes.size() != 4) throw py::value_error(std::string(name) + " must be 4-D (N, C, H, W), got " + str(a.sizes));
  float_code(a);
  return a;
}

// A second (N, C, H, W) tensor of the logits' shape and dtype (a gradient, the softmax's output).
fas::Tensor4 like(py::handle t, const char* name, const Arg& ref, bool output) {
  const Arg a = read(t, name);
  if (!a.present) return {};
  expect_shape(a, ref.sizes, ref.name);
  if (!a.is(ref.dtype))
    throw py::type_error(std::string(name) + " must have the dtype of " + ref.name + " (" + ref.dtype_name() +
                         "), got " + a.dtype_name());
  if (output) expect_non_overlapping(a);
  return tensor4(a);
}

// An (N, H, W) map of the element type the kernels read for it.
fas::Map3 map3(py::handle t, const char* name, const Sizes& nhw, const py::object& dtype, const char* what,
               const char* against) {
  const Arg a = read(t, name);
  fas::Map3 m;
  if (!a.present) return m;
  expect_dtype(a, dtype, what);
  expect_shape(a, nhw, against);
  m.ptr = a.ptr;
  m.s0 = a.strides[0];
  m.s1 = a.strides[1];
  m.s2 = a.strides[2];
  return m;
}

// A contiguous (N, H, W) float32 output (loss map, gradient of a map), written at flat pixel indices.
float* out_map(py::handle t, const char* name, const Sizes& nhw, const char* against) {
  const Arg a = read(t, name);
  if (!a.present) return nullptr;
  expect_dtype(a, torch_objects->float32, "float32");
  expect_shape(a, nhw, against);
  expect_contiguous(a);
  return static_cast<float*>(a.ptr);
}

Sizes nhw_of(const Sizes& nchw) { return {nchw[0], nchw[2], nchw[3]}; }

// The full resolution (H, W) a resizing launch makes (None: no resize), two positive sizes.
bool read_size(py::handle size, const char* name, int64_t& H, int64_t& W) {
  if (size.is_none()) return false;
  Sizes s;
  try {
    s = size.cast<Sizes>();
  } catch (const py::cast_error&) {
    throw py::type_error(std::string(name) + " must be None or two ints (H, W), got " +
                         std::string(py::str(py::repr(size))));
  }
  if (s.size() != 2 || s[0] < 1 || s[1] < 1)
    throw py::value_error(std::string(name) + " must be two positive sizes (H, W), got " + str(s));
  H = s[0];
  W = s[1];
  return true;
}

// A tensor of spatial size (h, w) resized to (H, W): interpolation needs a point to start from.
void expect_resizable(const Arg& a, int64_t h, int64_t w, int64_t H, int64_t W) {
  if ((h != H || w != W) && (h < 1 || w < 1))
    throw py::value_error(std::string(a.name) + " " + str(a.sizes) + " has no pixel to resize to size " +
                          str(Sizes{H, W}));
}

// A low-resolution D map (N, h, w) (float32) resized to (H, W) when its spatial size differs: its N must be `n`.
fas::Map3 low_map(const Arg& a, int64_t n, int64_t H, int64_t W, const char* against, int64_t& h, int64_t& w) {
  fas::Map3 m;
  if (!a.present) return m;
  if (a.sizes.size() != 3 || a.sizes[0] != n)
    throw py::value_error(std::string(a.name) + " " + str(a.sizes) + " does not match " + against +
                          ": need (" + std::to_string(n) + ", h, w)");
  expect_dtype(a, torch_objects->float32, "float32");
  h = a.sizes[1];
  w = a.sizes[2];
  expect_resizable(a, h, w, H, W);
  m.ptr = a.ptr;
  m.s0 = a.strides[0];
  m.s1 = a.strides[1];
  m.s2 = a.strides[2];
  return m;
}

}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "fastadvseg cpu backend kernels (C++/OpenMP); called by fastadvseg/backends/cpu.py";
  {
    py::module_ torch = py::module_::import("torch");
    torch_objects = new TorchObjects{torch.attr("Tensor"), torch.attr("float32"), torch.attr("float16"),
                                     torch.attr("bfloat16"), torch.attr("int64"), torch.attr("bool")};
  }
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.def("isa", &fas::isa, "the kernel build in use: 'avx512' (AVX-512 F/VL/DQ/BW), 'avx2' (AVX2 + FMA) or 'base' (portable)");
  m.def("stream_bytes", &fas::stream_bytes, "float32 outputs of this many bytes or more are written with streaming stores");
  m.def("default_stream_bytes", &fas::default_stream_bytes, "max(8 MiB, half the L3 cache one core sees): stream_bytes unless set");
  m.def("l3_cache_bytes", &fas::l3_cache_bytes, "the L3 cache one core sees, in bytes (sysfs, else sysconf; 0 if unknown)");
  m.def("parse_cache_size", [](const std::string& s) { return fas::parse_cache_size(s.c_str()); },
        "bytes of a sysfs cache size such as '32768K' (0 if unreadable)");
  m.def("set_stream_bytes", &fas::set_stream_bytes, "override stream_bytes for this process (0: the default again)");

  m.def(
      "fused_loss",
      [](const Sizes& nchw, py::object x, py::object grad, double grad_scale, py::object labels, int64_t ignore_index,
         py::object weight, py::object z, py::object mask, int keep_mode, double threshold, int adv_mode,
         py::object loss_map, py::object grad_z, double grad_z_scale, bool maps_only, int num_threads,
         double label_smoothing, py::object size, bool align_corners, py::object teacher,
         py::object confidence_threshold) {
        if (nchw.size() != 4 || *std::min_element(nchw.begin(), nchw.end()) < 0)
          throw py::value_error("fused_loss: sizes must be (N, C, H, W), got " + str(nchw));
        fas::FusedArgs a;
        a.N = nchw[0];
        a.C = nchw[1];
        a.H = nchw[2];
        a.W = nchw[3];
        // size (H, W): the maps are at (H, W); the logits (sizes) and d_logits are resized to it where they differ
        const bool resize = read_size(size, "size", a.H, a.W);
        a.xH = nchw[2];
        a.xW = nchw[3];
        a.align_corners = align_corners;
        const Sizes nhw{a.N, a.H, a.W};
        const char* maps_against = resize ? "the logits' N and size (N, H, W)" : "the logits' (N, H, W)";
        if (!maps_only) {
          const Arg xa = logits(x, "logits");
          expect_shape(xa, nchw, "the sizes");
          if (resize) expect_resizable(xa, a.xH, a.xW, a.H, a.W);
          a.x = tensor4(xa);
          a.grad = like(grad, "grad", xa, true);
        } else if (!grad.is_none()) {
          throw py::value_error("fused_loss: maps_only reads no logits and writes no gradient");
        }
        a.grad_scale = static_cast<float>(grad_scale);
        a.labels = map3(labels, "target", nhw, torch_objects->int64, "int64", maps_against);
        a.label_mode = labels.is_none() ? 1 : 0;
        a.ignore_index = ignore_index;
        const Arg ta = read(teacher, "teacher_logits");
        if (ta.present) {
          if (maps_only) throw py::value_error("fused_loss: maps_only reads no teacher_logits");
          if (a.label_mode != 1) throw py::value_error("fused_loss: teacher_logits replace the target");
          const Arg xa = logits(x, "logits");
          if (ta.sizes.size() != 4 || ta.sizes[0] != a.N || ta.sizes[1] != a.C)
            throw py::value_error("teacher_logits " + str(ta.sizes) + " does not match the logits' (N, C): need (" +
                                  std::to_string(a.N) + ", " + std::to_string(a.C) + ", h, w)");
          if (!ta.is(xa.dtype))
            throw py::type_error("teacher_logits must have the dtype of logits (" + xa.dtype_name() + "), got " +
                                 ta.dtype_name());
          if (resize) {
            expect_resizable(ta, ta.sizes[2], ta.sizes[3], a.H, a.W);
            a.tH = ta.sizes[2];
            a.tW = ta.sizes[3];
          } else {
            expect_shape(ta, nchw, "the logits");
          }
          a.teacher = tensor4(ta);
        }
        if (!confidence_threshold.is_none()) {
          double tau = 0.0;
          try {
            tau = confidence_threshold.cast<double>();
          } catch (const py::cast_error&) {
            throw py::type_error("confidence_threshold must be None or a float, got " +
                                 std::string(py::str(py::repr(confidence_threshold))));
          }
          if (!(tau >= 0.0 && tau <= 1.0))
            throw py::value_error("fused_loss: confidence_threshold must be in [0, 1], got " + std::to_string(tau));
          if (maps_only) throw py::value_error("fused_loss: maps_only cannot test the teacher's confidence");
          if (a.label_mode != 1 || !keep_mode)
            throw py::value_error("fused_loss: confidence_threshold needs pseudo-labels (no target) and keep_mode");
          a.confidence_test = true;
          a.confidence = static_cast<float>(tau);
        }
        const Arg w = read(weight, "weight");
        if (w.present) {
          expect_dtype(w, torch_objects->float32, "float32");
          expect_shape(w, Sizes{a.C}, "the logits' class count C");
          expect_contiguous(w);
          if (a.label_mode != 0) throw py::value_error("fused_loss: class weights need labels");
          a.weight = static_cast<const float*>(w.ptr);
        }
        Sizes z_sizes = nhw;  // d_logits' own sizes, those of its gradient
        if (resize) {
          const Arg za = read(z, "d_logits");
          a.z = low_map(za, a.N, a.H, a.W, "the logits' N", a.zH, a.zW);
          if (za.present) z_sizes = za.sizes;
        } else {
          a.z = map3(z, "d_logits", nhw, torch_objects->float32, "float32", "the logits' (N, H, W)");
        }
        a.mask = map3(mask, "ignore_mask", nhw, torch_objects->boolean, "bool", maps_against);
        a.keep_mode = keep_mode;
        a.threshold = static_cast<float>(threshold);
        a.adv_mode = adv_mode;
        a.loss_map = out_map(loss_map, "loss_map", nhw, maps_against);
        a.grad_z = out_map(grad_z, "grad_d_logits", z_sizes, resize ? "d_logits" : "the logits' (N, H, W)");
        a.grad_z_scale = static_cast<float>(grad_z_scale);
        a.maps_only = maps_only;
        a.num_threads = num_threads;
        a.label_smoothing = static_cast<float>(label_smoothing);
        // (keep_mode without d_logits keeps the pixels that are not masked, less those the confidence test drops)
        if (adv_mode && !a.z.ptr && a.N * a.H * a.W > 0) throw py::value_error("fused_loss: d_logits missing");
        if (a.grad_z && !adv_mode) throw py::value_error("fused_loss: grad_d_logits needs adv_mode");
        if (!(label_smoothing >= 0.0 && label_smoothing <= 1.0))
          throw py::value_error("fused_loss: label_smoothing must be in [0, 1]");
        if (label_smoothing != 0.0 && a.label_mode != 0)
          throw py::value_error("fused_loss: label_smoothing needs labels");
        py::gil_scoped_release release;
        return fas::fused_loss(a);
      },
      py::arg("sizes"), py::arg("logits"), py::arg("grad"), py::arg("grad_scale"), py::arg("target"),
      py::arg("ignore_index"), py::arg("weight"), py::arg("d_logits"), py::arg("ignore_mask"), py::arg("keep_mode"),
      py::arg("threshold"), py::arg("adv_mode"), py::arg("loss_map"), py::arg("grad_d_logits"),
      py::arg("grad_d_logits_scale"), py::arg("maps_only"), py::arg("num_threads"), py::arg("label_smoothing") = 0.0,
      py::arg("size") = py::none(), py::arg("align_corners") = false, py::arg("teacher_logits") = py::none(),
      py::arg("confidence_threshold") = py::none(),
      "One pass over the logits (N, C, H, W; float32, float16 or bfloat16, any strides): weighted nll sum, weight "
      "sum, adversarial sum and count, kept and considered pixel counts, count of labels outside [0, C) that are "
      "not ignore_index and the flat index of the first (-1 if none). target: int64 (N, H, W) labels, or None for "
      "the pseudo-labels argmax_c x (keep_mode 1). weight: float32 (C,). d_logits: float32 (N, H, W). "
      "ignore_mask: bool (N, H, W). Outputs, each optional (None): grad (the logits' shape and dtype), loss_map "
      "and grad_d_logits (contiguous float32 (N, H, W)), scaled by grad_scale / grad_d_logits_scale. maps_only: "
      "read the maps only (the counts), no logits. label_smoothing (labels only, in [0, 1]): PyTorch's "
      "cross_entropy label_smoothing; the weight sum stays the sum of the labels' class weights. size (H, W): "
      "the maps (target, ignore_mask, loss_map) are at (H, W), and the logits and d_logits (any (N, h, w)) are "
      "bilinearly resized to it where their size differs (F.interpolate's align_corners); counts are of (H, W) "
      "pixels, and grad and grad_d_logits have the shapes of the logits and d_logits: the gradient w.r.t. them. "
      "Pseudo-labels (target None): argmax_c of teacher_logits ((N, C, h, w) of the logits' dtype, any strides, "
      "resized to size like the logits; None: the logits themselves); keep_mode 1 keeps a pixel where it is not "
      "masked, sigmoid(d_logits) > threshold if d_logits is given, and the teacher's max softmax >= "
      "confidence_threshold if that is given (not with maps_only).");

  m.def(
      "softmax_forward",
      [](py::object x, py::object y, int num_threads, py::object size, bool align_corners) {
        const Arg xa = logits(x, "logits");
        const Sizes& s = xa.sizes;
        int64_t H = s[2], W = s[3];
        const bool resize = read_size(size, "size", H, W) && (H != s[2] || W != s[3]);
        if (!resize) {
          const fas::Tensor4 tx = tensor4(xa), ty = like(y, "out", xa, true);
          if (!ty.ptr && xa.numel() > 0) throw py::type_error("softmax_forward: out is required");
          py::gil_scoped_release release;
          fas::softmax_forward(s[0], s[1], s[2], s[3], tx, ty, num_threads);
          return;
        }
        expect_resizable(xa, s[2], s[3], H, W);
        const Arg ya = read(y, "out", false);
        expect_shape(ya, Sizes{s[0], s[1], H, W}, "the logits' (N, C) and size");
        if (!ya.is(xa.dtype))
          throw py::type_error("out must have the dtype of logits (" + xa.dtype_name() + "), got " + ya.dtype_name());
        expect_non_overlapping(ya);
        const fas::Tensor4 tx = tensor4(xa), ty = tensor4(ya);
        py::gil_scoped_release release;
        fas::softmax_forward_resized(s[0], s[1], H, W, s[2], s[3], align_corners, tx, ty, num_threads);
      },
      py::arg("logits"), py::arg("out"), py::arg("num_threads"), py::arg("size") = py::none(),
      py::arg("align_corners") = false,
      "out = softmax over the channels of logits (N, C, H, W); out of the same shape and dtype. size (H, W): the "
      "logits are bilinearly resized to it first (F.interpolate's align_corners), out is (N, C, H, W)");

  m.def(
      "softmax_backward",
      [](py::object y, py::object gy, py::object gx, int num_threads, py::object low_size, bool align_corners) {
        const Arg ya = logits(y, "probs");
        const Sizes& s = ya.sizes;
        int64_t h = s[2], w = s[3];
        const bool resize = read_size(low_size, "low_size", h, w) && (h != s[2] || w != s[3]);
        const fas::Tensor4 tgy = like(gy, "grad_probs", ya, false);
        if (!resize) {
          const fas::Tensor4 tgx = like(gx, "grad_logits", ya, true);
          if ((!tgy.ptr || !tgx.ptr) && ya.numel() > 0)
            throw py::type_error("softmax_backward: grad_probs and grad_logits are required");
          py::gil_scoped_release release;
          fas::softmax_backward(s[0], s[1], s[2], s[3], tensor4(ya), tgy, tgx, num_threads);
          return;
        }
        if (!tgy.ptr && ya.numel() > 0) throw py::type_error("softmax_backward: grad_probs is required");
        const Arg ga = read(gx, "grad_logits", false);
        expect_shape(ga, Sizes{s[0], s[1], h, w}, "probs' (N, C) and low_size");
        if (!ga.is(ya.dtype))
          throw py::type_error("grad_logits must have the dtype of probs (" + ya.dtype_name() + "), got " +
                               ga.dtype_name());
        expect_non_overlapping(ga);
        const fas::Tensor4 tgx = tensor4(ga);
        py::gil_scoped_release release;
        fas::softmax_backward_resized(s[0], s[1], s[2], s[3], h, w, align_corners, tensor4(ya), tgy, tgx,
                                      num_threads);
      },
      py::arg("probs"), py::arg("grad_probs"), py::arg("grad_logits"), py::arg("num_threads"),
      py::arg("low_size") = py::none(), py::arg("align_corners") = false,
      "grad_logits = probs * (grad_probs - sum_c probs * grad_probs); all three of one shape and dtype. low_size "
      "(h, w): probs came from logits (N, C, h, w) bilinearly resized to probs' size (F.interpolate's "
      "align_corners); grad_logits is (N, C, h, w), the gradient w.r.t. those logits");

  m.def(
      "one_hot",
      [](py::object labels, py::object out, int64_t ignore_index, uint64_t one, int num_threads) {
        const Arg o = read(out, "out", false);
        if (o.sizes.size() != 4) throw py::value_error("one_hot: out must be 4-D (N, C, H, W), got " + str(o.sizes));
        expect_contiguous(o);
        const int elem_size = o.dtype.attr("itemsize").cast<int>();
        if (elem_size != 1 && elem_size != 2 && elem_size != 4 && elem_size != 8)
          throw py::type_error("one_hot: no kernel for " + o.dtype_name() + " (element size " +
                               std::to_string(elem_size) + ")");
        const Sizes& s = o.sizes;
        const fas::Map3 lab = map3(labels, "target", nhw_of(s), torch_objects->int64, "int64", "out's (N, H, W)");
        if (!lab.ptr && o.numel() > 0) throw py::type_error("one_hot: target is required");
        py::gil_scoped_release release;
        fas::one_hot(s[0], s[1], s[2], s[3], lab, ignore_index, o.ptr, elem_size, one, num_threads);
      },
      py::arg("target"), py::arg("out"), py::arg("ignore_index"), py::arg("one"), py::arg("num_threads"),
      "Fills out, a contiguous (N, C, H, W) tensor of a 1/2/4/8-byte dtype, with the one-hot of the int64 (N, H, W) "
      "target (all zeros at ignore_index and at labels outside [0, C)); one: the bit pattern of 1 in out's dtype.");

  m.def(
      "find_bad_labels",
      [](py::object labels, int64_t num_classes, int64_t ignore_index, int num_threads) {
        const Arg a = read(labels, "target", false);
        if (a.sizes.size() != 3) throw py::value_error("find_bad_labels: target must be (N, H, W), got " + str(a.sizes));
        const fas::Map3 lab = map3(labels, "target", a.sizes, torch_objects->int64, "int64", "itself");
        const Sizes& s = a.sizes;
        py::gil_scoped_release release;
        return fas::find_bad_labels(s[0], s[1], s[2], lab, num_classes, ignore_index, num_threads);
      },
      py::arg("target"), py::arg("num_classes"), py::arg("ignore_index"), py::arg("num_threads"),
      "int64 (N, H, W) labels outside [0, C) that are not ignore_index: [count, first such value (0 if none)].");

  m.def(
      "bce_maps",
      [](const std::vector<std::tuple<py::object, py::object, double, py::object, py::object, py::object, double>>&
             jobs,
         int num_threads, py::object size, bool align_corners) {
        // job: (d_logits, target map or None, target value, ignore_mask or None, loss_map or None, grad or None,
        // grad scale)
        int64_t H = 0, W = 0;
        const bool resize = read_size(size, "size", H, W);
        std::vector<fas::BceArgs> maps;
        for (const auto& j : jobs) {
          const Arg z = read(std::get<0>(j), "d_logits", false);
          if (z.sizes.size() != 3) throw py::value_error("bce_maps: d_logits must be (N, H, W), got " + str(z.sizes));
          expect_dtype(z, torch_objects->float32, "float32");
          fas::BceArgs b;
          b.N = z.sizes[0];
          b.H = resize ? H : z.sizes[1];
          b.W = resize ? W : z.sizes[2];
          b.z = map3(std::get<0>(j), "d_logits", z.sizes, torch_objects->float32, "float32", "itself");
          if (resize) {
            expect_resizable(z, z.sizes[1], z.sizes[2], H, W);
            b.zH = z.sizes[1];
            b.zW = z.sizes[2];
            b.align_corners = align_corners;
          }
          const Sizes nhw{b.N, b.H, b.W};
          const char* against = resize ? "d_logits' N and size (N, H, W)" : "d_logits";
          b.target = map3(std::get<1>(j), "target", nhw, torch_objects->float32, "float32", against);
          b.target_value = static_cast<float>(std::get<2>(j));
          b.mask = map3(std::get<3>(j), "ignore_mask", nhw, torch_objects->boolean, "bool", against);
          b.loss_map = out_map(std::get<4>(j), "loss_map", nhw, against);
          b.grad = out_map(std::get<5>(j), "grad", z.sizes, "d_logits");
          b.grad_scale = static_cast<float>(std::get<6>(j));
          maps.push_back(b);
        }
        py::gil_scoped_release release;
        return fas::bce_maps(maps, num_threads);
      },
      py::arg("jobs"), py::arg("num_threads"), py::arg("size") = py::none(), py::arg("align_corners") = false,
      "BCE with logits over float32 (N, H, W) maps, each job (d_logits, target map or None, target value, "
      "ignore_mask or None, loss_map or None, grad or None, grad scale): [loss sum, count] per map; optional "
      "contiguous float32 loss maps and gradients. size (H, W): each d_logits (N, h, w) is bilinearly resized to "
      "it where its size differs (F.interpolate's align_corners); target maps, masks and loss maps are (N, H, W), "
      "counts are of (H, W) pixels, and grad has d_logits' shape (the gradient w.r.t. it).");

  m.def(
      "resize_axis",
      [](int64_t in, int64_t out, bool align_corners) {
        if (in < 1 || out < 1)
          throw py::value_error("resize_axis: in and out must be positive, got " + std::to_string(in) + " and " +
                                std::to_string(out));
        const fas::ResizeAxis a = fas::resize_axis(in, out, align_corners);
        return py::make_tuple(a.i0, a.i1, a.l0, a.l1);
      },
      py::arg("in"), py::arg("out"), py::arg("align_corners"),
      "The bilinear resize tables of one axis the kernels use (PyTorch's source indices and weights): "
      "(i0, i1, l0, l1), output d = x[i0[d]] l0[d] + x[i1[d]] l1[d].");
}
