// Operator schemas of the msfused library. Kernels register per dispatch key: CPU
// (csrc/cpu), CUDA (csrc/cuda), Autograd (csrc/autograd.cpp), AutocastCPU/AutocastCUDA
// (csrc/autocast.cpp); the fake (shape-only) kernels for torch.compile and export are
// registered in Python (msfused/ops/extension.py).
#include <ATen/ATen.h>
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "activations.h"
#include "cpu/output_cache.h"

extern "C" {
// `import msfused._C` loads this library and so runs the registrations below. The module
// itself is empty: no pybind11, which keeps compile time down.
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
}

namespace msfused {
namespace {

// "name:code:saves;..." from csrc/activations.h, for the test that Python's table
// (msfused/activations.py) agrees with it.
std::string activation_table() {
  std::string s;
#define MSF_ACT_ROW(E, name, code, saves) \
  s += std::string(name) + ":" + std::to_string(code) + ":" + std::to_string(saves) + ";";
  MSFUSED_ACTIVATIONS(MSF_ACT_ROW)
#undef MSF_ACT_ROW
  return s;
}

// act(v) and g * act'(v) elementwise by the C++ table (float64 CPU tensors), for the same test.
std::tuple<at::Tensor, at::Tensor> activation_eval(const at::Tensor& v, const at::Tensor& g,
                                                   int64_t act) {
  TORCH_CHECK_VALUE(act_valid(act), "act: expected one of ",
                    kActivationList, "got ", act);
  TORCH_CHECK_TYPE(v.scalar_type() == at::kDouble && g.scalar_type() == at::kDouble,
                   "v, g: expected float64 tensors");
  TORCH_CHECK_VALUE(v.sizes() == g.sizes(), "g: expected the shape of v");
  at::Tensor vc = v.contiguous(), gc = g.contiguous();
  at::Tensor f = at::empty_like(vc), d = at::empty_like(vc);
  const double *pv = vc.data_ptr<double>(), *pg = gc.data_ptr<double>();
  double *pf = f.data_ptr<double>(), *pd = d.data_ptr<double>();
  dispatch_act(static_cast<int>(act), [&](auto a) {
    using Op = ActOp<decltype(a)::value>;
    for (int64_t i = 0; i < vc.numel(); ++i) {
      pf[i] = Op::fwd(pv[i]);
      pd[i] = Op::grad(pg[i], pv[i]);
    }
  });
  return {f, d};
}

}  // namespace
}  // namespace msfused

TORCH_LIBRARY(msfused, m) {
  // Returns (y, preact); preact is the pre-activation when save_preact, else an empty
  // tensor (autograd saves what the final activation's gradient needs by itself).
  // merge: 0 concat, 1 add; act: the codes of csrc/activations.h.
  m.def(
      "block_forward(Tensor x, Tensor wa, Tensor? ba, Tensor wb, Tensor? bb, Tensor wc, "
      "Tensor? bc, Tensor pa, Tensor? qa, Tensor pb, Tensor? qb, Tensor? ws, Tensor? bs, "
      "int stride, int merge, int act, bool residual, bool save_preact) -> (Tensor, Tensor)");
  // saved: what the final activation's gradient reads (activations.h ActSaves): y, the
  // pre-activation, or an empty tensor. Returns [dx, dwa, dba, dwb, dbb, dwc, dbc, dpa, dqa,
  // dpb, dqb, dws, dbs]; the bias gradients always, dws/dbs empty without projection.
  m.def(
      "block_backward(Tensor grad_y, Tensor x, Tensor saved, Tensor wa, Tensor? ba, "
      "Tensor wb, Tensor? bb, Tensor wc, Tensor? bc, Tensor pa, Tensor? qa, Tensor pb, "
      "Tensor? qb, Tensor? ws, Tensor? bs, int stride, int merge, int act, bool residual) "
      "-> Tensor[]");
  m.def("_activation_table() -> str", &msfused::activation_table);
  m.def("_activation_eval(Tensor v, Tensor g, int act) -> (Tensor, Tensor)");
  // The CPU output cache (csrc/cpu/output_cache.h): return its idle blocks to the system
  // (the bytes released), and the bytes it holds idle.
  m.def("_empty_cpu_cache() -> int", &msfused::cpu::release_output_cache);
  m.def("_cpu_cache_idle_bytes() -> int", &msfused::cpu::output_cache_idle_bytes);
}

TORCH_LIBRARY_IMPL(msfused, CPU, m) { m.impl("_activation_eval", &msfused::activation_eval); }
