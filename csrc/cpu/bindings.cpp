// Python bindings of the cpu backend's kernels (module fastadvseg._C_cpu).
//
// Plain pybind11, no torch headers. The binding receives the torch tensors themselves, never their addresses as
// integers: the call's own arguments hold a reference to every tensor until the binding returns, after the kernel
// has finished, so no memory a kernel reads or writes can be freed during the launch (a temporary converted
// inline by the caller, `f(t.float())`, lives as long as the call). Each tensor is read through its Python
// interface (data_ptr, dtype, shape, stride, is_cpu) and checked against what the kernel will touch: device,
// dtype, dimensions, shape against the logits, a weight's length, outputs non-overlapping. A bad
// argument is a TypeError or ValueError naming it, never an out-of-bounds access. The GIL is released while a
// kernel runs, after the checks.
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
         double label_smoothing) {
        if (nchw.size() != 4 || *std::min_element(nchw.begin(), nchw.end()) < 0)
          throw py::value_error("fused_loss: sizes must be (N, C, H, W), got " + str(nchw));
        const Sizes nhw = nhw_of(nchw);
        fas::FusedArgs a;
        a.N = nchw[0];
        a.C = nchw[1];
        a.H = nchw[2];
        a.W = nchw[3];
        if (!maps_only) {
          const Arg xa = logits(x, "logits");
          expect_shape(xa, nchw, "the sizes");
          a.x = tensor4(xa);
          a.grad = like(grad, "grad", xa, true);
        } else if (!grad.is_none()) {
          throw py::value_error("fused_loss: maps_only reads no logits and writes no gradient");
        }
        a.grad_scale = static_cast<float>(grad_scale);
        a.labels = map3(labels, "target", nhw, torch_objects->int64, "int64", "the logits' (N, H, W)");
        a.label_mode = labels.is_none() ? 1 : 0;
        a.ignore_index = ignore_index;
        const Arg w = read(weight, "weight");
        if (w.present) {
          expect_dtype(w, torch_objects->float32, "float32");
          expect_shape(w, Sizes{a.C}, "the logits' class count C");
          expect_contiguous(w);
          if (a.label_mode != 0) throw py::value_error("fused_loss: class weights need labels");
          a.weight = static_cast<const float*>(w.ptr);
        }
        a.z = map3(z, "d_logits", nhw, torch_objects->float32, "float32", "the logits' (N, H, W)");
        a.mask = map3(mask, "ignore_mask", nhw, torch_objects->boolean, "bool", "the logits' (N, H, W)");
        a.keep_mode = keep_mode;
        a.threshold = static_cast<float>(threshold);
        a.adv_mode = adv_mode;
        a.loss_map = out_map(loss_map, "loss_map", nhw, "the logits' (N, H, W)");
        a.grad_z = out_map(grad_z, "grad_d_logits", nhw, "the logits' (N, H, W)");
        a.grad_z_scale = static_cast<float>(grad_z_scale);
        a.maps_only = maps_only;
        a.num_threads = num_threads;
        a.label_smoothing = static_cast<float>(label_smoothing);
        if ((keep_mode || adv_mode) && !a.z.ptr && a.N * a.H * a.W > 0)
          throw py::value_error("fused_loss: d_logits missing");
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
      "One pass over the logits (N, C, H, W; float32, float16 or bfloat16, any strides): weighted nll sum, weight "
      "sum, adversarial sum and count, kept and considered pixel counts, count of labels outside [0, C) that are "
      "not ignore_index and the flat index of the first (-1 if none). target: int64 (N, H, W) labels, or None for "
      "the pseudo-labels argmax_c x (keep_mode 1). weight: float32 (C,). d_logits: float32 (N, H, W). "
      "ignore_mask: bool (N, H, W). Outputs, each optional (None): grad (the logits' shape and dtype), loss_map "
      "and grad_d_logits (contiguous float32 (N, H, W)), scaled by grad_scale / grad_d_logits_scale. maps_only: "
      "read the maps only (the counts), no logits. label_smoothing (labels only, in [0, 1]): PyTorch's "
      "cross_entropy label_smoothing; the weight sum stays the sum of the labels' class weights.");

  m.def(
      "softmax_forward",
      [](py::object x, py::object y, int num_threads) {
        const Arg xa = logits(x, "logits");
        const fas::Tensor4 tx = tensor4(xa), ty = like(y, "out", xa, true);
        if (!ty.ptr && xa.numel() > 0) throw py::type_error("softmax_forward: out is required");
        const Sizes& s = xa.sizes;
        py::gil_scoped_release release;
        fas::softmax_forward(s[0], s[1], s[2], s[3], tx, ty, num_threads);
      },
      py::arg("logits"), py::arg("out"), py::arg("num_threads"),
      "out = softmax over the channels of logits (N, C, H, W); out of the same shape and dtype");

  m.def(
      "softmax_backward",
      [](py::object y, py::object gy, py::object gx, int num_threads) {
        const Arg ya = logits(y, "probs");
        const fas::Tensor4 tgy = like(gy, "grad_probs", ya, false), tgx = like(gx, "grad_logits", ya, true);
        if ((!tgy.ptr || !tgx.ptr) && ya.numel() > 0)
          throw py::type_error("softmax_backward: grad_probs and grad_logits are required");
        const Sizes& s = ya.sizes;
        py::gil_scoped_release release;
        fas::softmax_backward(s[0], s[1], s[2], s[3], tensor4(ya), tgy, tgx, num_threads);
      },
      py::arg("probs"), py::arg("grad_probs"), py::arg("grad_logits"), py::arg("num_threads"),
      "grad_logits = probs * (grad_probs - sum_c probs * grad_probs); all three of one shape and dtype");

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
         int num_threads) {
        // job: (d_logits, target map or None, target value, ignore_mask or None, loss_map or None, grad or None,
        // grad scale)
        std::vector<fas::BceArgs> maps;
        for (const auto& j : jobs) {
          const Arg z = read(std::get<0>(j), "d_logits", false);
          if (z.sizes.size() != 3) throw py::value_error("bce_maps: d_logits must be (N, H, W), got " + str(z.sizes));
          expect_dtype(z, torch_objects->float32, "float32");
          fas::BceArgs b;
          b.N = z.sizes[0];
          b.H = z.sizes[1];
          b.W = z.sizes[2];
          b.z = map3(std::get<0>(j), "d_logits", z.sizes, torch_objects->float32, "float32", "itself");
          b.target = map3(std::get<1>(j), "target", z.sizes, torch_objects->float32, "float32", "d_logits");
          b.target_value = static_cast<float>(std::get<2>(j));
          b.mask = map3(std::get<3>(j), "ignore_mask", z.sizes, torch_objects->boolean, "bool", "d_logits");
          b.loss_map = out_map(std::get<4>(j), "loss_map", z.sizes, "d_logits");
          b.grad = out_map(std::get<5>(j), "grad", z.sizes, "d_logits");
          b.grad_scale = static_cast<float>(std::get<6>(j));
          maps.push_back(b);
        }
        py::gil_scoped_release release;
        return fas::bce_maps(maps, num_threads);
      },
      py::arg("jobs"), py::arg("num_threads"),
      "BCE with logits over float32 (N, H, W) maps, each job (d_logits, target map or None, target value, "
      "ignore_mask or None, loss_map or None, grad or None, grad scale): [loss sum, count] per map; optional "
      "contiguous float32 loss maps and gradients.");
}
