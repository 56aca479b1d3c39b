// Schemas of the fused kernels behind segops's Python custom ops (library `segops_C`).
// Kernels register their implementations next to their code (csrc/cpu/<op>.cpp for CPU,
// csrc/cuda/<op>_binding.cpp for CUDA). The public ops `segops::<name>` (with fakes,
// autograd and backend dispatch) are defined in Python, in segops/ops/<name>.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(segops_C, m) {
  // One block per operator; each op's forward returns what its backward needs.

  // semantic_difference_conv2d (SPEC 2.4): the backward recomputes the weighted differences.
  m.def("semantic_difference_conv2d_forward(Tensor input, Tensor guidance, Tensor weight, "
        "Tensor? bias, int dilation, str similarity, float sigma) -> Tensor");
  m.def("semantic_difference_conv2d_backward(Tensor grad_out, Tensor input, Tensor guidance, "
        "Tensor weight, int dilation, str similarity, float sigma) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

// A loadable Python module, so `import segops._C` registers the library above.
static struct PyModuleDef segops_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&segops_c_module); }
