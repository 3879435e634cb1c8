// The Python module `interest_kernels._C`: importing it loads this shared library, whose
// static initialisers register the torch.library operators. It defines no Python names.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "Compiled MBA operators (torch.ops.interest_kernels)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}
