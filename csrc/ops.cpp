// Operator schemas of the msfused library. Kernels register per device (csrc/cpu,
// csrc/cuda); fake kernels and autograd are registered in Python (msfused/fused_ops.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import msfused._C` loads this library and so runs the registrations below. The module
// itself is empty: no pybind11, which keeps compile time down.
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
}

TORCH_LIBRARY(msfused, m) {
  // Returns (y, preact); preact is the pre-activation when save_preact (silu training),
  // else an empty tensor. merge: 0 concat, 1 add. act: 0 none, 1 relu, 2 relu6, 3 silu.
  m.def(
      "block_forward(Tensor x, Tensor wa, Tensor? ba, Tensor wb, Tensor? bb, Tensor wc, "
      "Tensor? bc, Tensor pa, Tensor? qa, Tensor pb, Tensor? qb, Tensor? ws, Tensor? bs, "
      "int stride, int merge, int act, bool residual, bool save_preact) -> (Tensor, Tensor)");
  // saved: y for relu/relu6, the pre-activation for silu, empty for none.
  // Returns [dx, dwa, dba, dwb, dbb, dwc, dbc, dpa, dqa, dpb, dqb, dws, dbs]; the bias
  // gradients always, dws/dbs empty without projection.
  m.def(
      "block_backward(Tensor grad_y, Tensor x, Tensor saved, Tensor wa, Tensor? ba, "
      "Tensor wb, Tensor? bb, Tensor wc, Tensor? bc, Tensor pa, Tensor? qa, Tensor pb, "
      "Tensor? qb, Tensor? ws, Tensor? bs, int stride, int merge, int act, bool residual) "
      "-> Tensor[]");
}
