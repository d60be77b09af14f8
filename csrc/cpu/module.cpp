// The Python module of one CPU kernel variant (fusedbn._cpu_default or fusedbn._cpu_avx2;
// fusedbn/_ext.py imports exactly one of them). Importing it loads the shared library, whose static
// initializer (register.cpp) registers the variant's kernels; the module itself only says which
// variant it is. Plain CPython API: this file is compiled once per variant, and pybind11's headers
// would cost more compile time than everything it does.
#include <Python.h>

#define FUSEDBN_CAT_(a, b) a##b
#define FUSEDBN_CAT(a, b) FUSEDBN_CAT_(a, b)
#define FUSEDBN_STR_(a) #a
#define FUSEDBN_STR(a) FUSEDBN_STR_(a)

#if defined(CPU_CAPABILITY_AVX2)
#define FUSEDBN_CPU_VARIANT "avx2"
#else
#define FUSEDBN_CPU_VARIANT "default"
#endif

namespace {
PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, FUSEDBN_STR(TORCH_EXTENSION_NAME),
    "fusedbn CPU kernels (one instruction-set variant)", -1, nullptr, nullptr, nullptr, nullptr,
    nullptr};
}  // namespace

PyMODINIT_FUNC FUSEDBN_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m != nullptr && PyModule_AddStringConstant(m, "variant", FUSEDBN_CPU_VARIANT) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
