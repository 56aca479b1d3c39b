// Schemas of the fused kernels behind segops's Python custom ops (library `segops_C`).
// Kernels register their implementations next to their code (csrc/cpu/<op>.cpp for CPU,
// csrc/cuda/<op>_binding.cpp for CUDA). The public ops `segops::<name>` (with fakes,
// autograd and backend dispatch) are defined in Python, in segops/ops/<name>.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(segops_C, m) {
  // One block per operator; each op's forward returns what its backward needs.
  // disentangled_non_local (SPEC §2.3): flattened (N, C, L) inputs, s = scale / temperature;
  // forward returns (out, lse (N, Lq), g (N, Cv), lse_u (N,)); backward (dq, dk, dv, du).
  m.def("disentangled_non_local_forward(Tensor query, Tensor key, Tensor value, Tensor? unary, "
        "bool whiten, float s) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("disentangled_non_local_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
        "Tensor? unary, Tensor out, Tensor lse, Tensor g, Tensor lse_u, bool whiten, float s) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

// A loadable Python module, so `import segops._C` registers the library above.
static struct PyModuleDef segops_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&segops_c_module); }
