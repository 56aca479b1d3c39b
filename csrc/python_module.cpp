// A loadable Python module, so `import segops._C` registers the segops_C kernels
// (csrc/register.cpp and the TORCH_LIBRARY_IMPL blocks) with the dispatcher.
#include <Python.h>

static struct PyModuleDef segops_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&segops_c_module); }
