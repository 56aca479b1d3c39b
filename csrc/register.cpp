// Schemas of the fused kernels behind segops's Python custom ops (library `segops_C`).
// Kernels register their implementations next to their code (csrc/cpu/<op>.cpp for CPU,
// csrc/cuda/<op>_binding.cpp for CUDA). The public ops `segops::<name>` (with fakes,
// autograd and backend dispatch) are defined in Python, in segops/ops/<name>.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(segops_C, m) {
  // One block per operator; each op's forward returns what its backward needs.

  // qco (qco_1d with grid 1 and cooc false, qco_2d with cooc true): forward ->
  // (hist, levels, sim, rnorm, mean, stats), see segops/ops/qco.py; texture_reconstruct saves
  // nothing beyond its inputs.
  m.def("qco_forward(Tensor x, int num_levels, int grid, bool cooc) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("qco_backward(Tensor grad_hist, Tensor grad_levels, Tensor? grad_sim, Tensor x, "
        "Tensor hist, Tensor sim, Tensor rnorm, Tensor mean, Tensor stats, int num_levels, "
        "int grid, bool cooc) -> Tensor");
  m.def("texture_reconstruct_forward(Tensor sim, Tensor levels, Tensor features) -> Tensor");
  m.def("texture_reconstruct_backward(Tensor grad_out, Tensor sim, Tensor levels, "
        "Tensor features) -> (Tensor, Tensor, Tensor)");
}

// A loadable Python module, so `import segops._C` registers the library above.
static struct PyModuleDef segops_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&segops_c_module); }
