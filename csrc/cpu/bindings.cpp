// Python bindings of the cpu backend's kernels (module fastadvseg._C_cpu).
//
// Plain pybind11, no torch headers: fastadvseg/backends/cpu.py passes data pointers, sizes, strides (in elements)
// and dtype codes. A 4-D tensor is (ptr, dtype, sN, sC, sH, sW); an (N, H, W) map is (ptr, s0, s1, s2), ptr 0 =
// absent. The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "kernels.h"

namespace py = pybind11;
using Spec = std::vector<int64_t>;

namespace {

fas::Tensor4 tensor4(const Spec& s, const char* what) {
  fas::Tensor4 t;
  if (s.empty()) return t;
  if (s.size() != 6) throw std::invalid_argument(std::string(what) + ": expected (ptr, dtype, sN, sC, sH, sW)");
  t.ptr = reinterpret_cast<void*>(static_cast<intptr_t>(s[0]));
  t.dtype = static_cast<int>(s[1]);
  t.sN = s[2];
  t.sC = s[3];
  t.sH = s[4];
  t.sW = s[5];
  return t;
}

fas::Map3 map3(const Spec& s, const char* what) {
  fas::Map3 m;
  if (s.empty()) return m;
  if (s.size() != 4) throw std::invalid_argument(std::string(what) + ": expected (ptr, s0, s1, s2)");
  m.ptr = reinterpret_cast<const void*>(static_cast<intptr_t>(s[0]));
  m.s0 = s[1];
  m.s1 = s[2];
  m.s2 = s[3];
  return m;
}

template <class P>
P* pointer(int64_t address) {
  return reinterpret_cast<P*>(static_cast<intptr_t>(address));
}

void check_nchw(const Spec& nchw) {
  if (nchw.size() != 4) throw std::invalid_argument("expected sizes (N, C, H, W)");
}

}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "fastadvseg cpu backend kernels (C++/OpenMP); called by fastadvseg/backends/cpu.py";
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
      [](const Spec& nchw, const Spec& x, const Spec& grad, double grad_scale, int label_mode, const Spec& labels,
         int64_t ignore_index, int64_t weight, const Spec& z, const Spec& mask, int keep_mode, double threshold,
         int adv_mode, int64_t loss_map, int64_t grad_z, double grad_z_scale, bool maps_only, int num_threads,
         double label_smoothing) {
        check_nchw(nchw);
        fas::FusedArgs a;
        a.N = nchw[0];
        a.C = nchw[1];
        a.H = nchw[2];
        a.W = nchw[3];
        a.x = tensor4(x, "x");
        a.grad = tensor4(grad, "grad");
        a.grad_scale = static_cast<float>(grad_scale);
        a.label_mode = label_mode;
        a.labels = map3(labels, "labels");
        a.ignore_index = ignore_index;
        a.weight = pointer<const float>(weight);
        a.z = map3(z, "z");
        a.mask = map3(mask, "mask");
        a.keep_mode = keep_mode;
        a.threshold = static_cast<float>(threshold);
        a.adv_mode = adv_mode;
        a.loss_map = pointer<float>(loss_map);
        a.grad_z = pointer<float>(grad_z);
        a.grad_z_scale = static_cast<float>(grad_z_scale);
        a.maps_only = maps_only;
        a.num_threads = num_threads;
        a.label_smoothing = static_cast<float>(label_smoothing);
        if (!maps_only && !a.x.ptr) throw std::invalid_argument("fused_loss: logits missing");
        if (label_mode == 0 && !a.labels.ptr) throw std::invalid_argument("fused_loss: labels missing");
        if ((keep_mode || adv_mode) && !a.z.ptr) throw std::invalid_argument("fused_loss: d_logits missing");
        if (a.grad.ptr && a.grad.dtype != a.x.dtype) throw std::invalid_argument("fused_loss: grad dtype");
        if (!(label_smoothing >= 0.0 && label_smoothing <= 1.0))
          throw std::invalid_argument("fused_loss: label_smoothing must be in [0, 1]");
        if (label_smoothing != 0.0 && label_mode != 0)
          throw std::invalid_argument("fused_loss: label_smoothing needs labels (label_mode 0)");
        return fas::fused_loss(a);
      },
      // the existing arguments stay positional-only (their names are not part of the interface); label_smoothing,
      // added last, is positional or keyword with a default
      py::arg("sizes"), py::arg("x"), py::arg("grad"), py::arg("grad_scale"), py::arg("label_mode"),
      py::arg("labels"), py::arg("ignore_index"), py::arg("weight"), py::arg("z"), py::arg("mask"),
      py::arg("keep_mode"), py::arg("threshold"), py::arg("adv_mode"), py::arg("loss_map"), py::arg("grad_z"),
      py::arg("grad_z_scale"), py::arg("maps_only"), py::arg("num_threads"), py::pos_only(),
      py::arg("label_smoothing") = 0.0, py::call_guard<py::gil_scoped_release>(),
      "One pass over the logits: weighted nll sum, weight sum, adversarial sum and count, kept and considered "
      "pixel counts, count of labels outside [0, C) that are not ignore_index and the flat index of the first "
      "(-1 if none); optional per-pixel loss map and gradients (scaled by grad_scale / grad_z_scale). "
      "label_smoothing (labels only, in [0, 1]): PyTorch's cross_entropy label_smoothing; the weight sum stays "
      "the sum of the labels' class weights.");

  m.def(
      "softmax_forward",
      [](const Spec& nchw, const Spec& x, const Spec& y, int num_threads) {
        check_nchw(nchw);
        const fas::Tensor4 tx = tensor4(x, "x"), ty = tensor4(y, "y");
        if (tx.dtype != ty.dtype) throw std::invalid_argument("softmax_forward: mixed dtypes");
        fas::softmax_forward(nchw[0], nchw[1], nchw[2], nchw[3], tx, ty, num_threads);
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "softmax_backward",
      [](const Spec& nchw, const Spec& y, const Spec& gy, const Spec& gx, int num_threads) {
        check_nchw(nchw);
        fas::softmax_backward(nchw[0], nchw[1], nchw[2], nchw[3], tensor4(y, "y"), tensor4(gy, "grad_y"),
                              tensor4(gx, "grad_x"), num_threads);
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "one_hot",
      [](const Spec& nchw, const Spec& labels, int64_t ignore_index, int64_t out, int elem_size, uint64_t one,
         int num_threads) {
        check_nchw(nchw);
        fas::one_hot(nchw[0], nchw[1], nchw[2], nchw[3], map3(labels, "labels"), ignore_index, pointer<void>(out),
                     elem_size, one, num_threads);
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "find_bad_labels",
      [](const Spec& nhw, const Spec& labels, int64_t num_classes, int64_t ignore_index, int num_threads) {
        if (nhw.size() != 3) throw std::invalid_argument("find_bad_labels: expected sizes (N, H, W)");
        return fas::find_bad_labels(nhw[0], nhw[1], nhw[2], map3(labels, "labels"), num_classes, ignore_index,
                                    num_threads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "int64 labels outside [0, C) that are not ignore_index: [count, first such value (0 if none)].");

  m.def(
      "bce_maps",
      [](const std::vector<std::tuple<Spec, Spec, Spec, double, Spec, int64_t, int64_t, double>>& jobs,
         int num_threads) {
        // job: ((N, H, W), z, target map or (), target value, mask or (), loss_map ptr, grad ptr, grad scale)
        std::vector<fas::BceArgs> maps;
        for (const auto& j : jobs) {
          const Spec& nhw = std::get<0>(j);
          if (nhw.size() != 3) throw std::invalid_argument("bce_maps: expected sizes (N, H, W)");
          fas::BceArgs b;
          b.N = nhw[0];
          b.H = nhw[1];
          b.W = nhw[2];
          b.z = map3(std::get<1>(j), "z");
          b.target = map3(std::get<2>(j), "target");
          b.target_value = static_cast<float>(std::get<3>(j));
          b.mask = map3(std::get<4>(j), "mask");
          b.loss_map = pointer<float>(std::get<5>(j));
          b.grad = pointer<float>(std::get<6>(j));
          b.grad_scale = static_cast<float>(std::get<7>(j));
          if (b.N * b.H * b.W > 0 && !b.z.ptr) throw std::invalid_argument("bce_maps: z missing");
          maps.push_back(b);
        }
        return fas::bce_maps(maps, num_threads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "BCE with logits over float32 maps: [loss sum, count] per map; optional loss maps and gradients.");
}
