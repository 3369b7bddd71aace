// Python module entry point for molora_ops._C (and the test module _C_emu).
//
// The ops are registered with the PyTorch dispatcher by static TORCH_LIBRARY_IMPL
// initialisers: importing the shared object (`import molora_ops._C`) runs them.
// The module's one function, set_value_checks(bool), switches the launchers' opt-in
// host value checks (molora_ops.set_value_checks calls it). No pybind11, no
// libtorch_python: just the CPython C API.
//
// Usage (exactly once, in one translation unit of the extension):
//   #include "registration.h"
//   REGISTER_EXTENSION(TORCH_EXTENSION_NAME)   // -> PyInit__C
#pragma once

#include <Python.h>

#include "common/check.h"

#define MOLORA_PP_CAT_IMPL(a, b) a##b
#define MOLORA_PP_CAT(a, b) MOLORA_PP_CAT_IMPL(a, b)
#define MOLORA_PP_STR_IMPL(x) #x
#define MOLORA_PP_STR(x) MOLORA_PP_STR_IMPL(x)

// Internal linkage on purpose (static, not inline): the module table must point at THIS module's
// copy of the flag setter. Inline functions with static locals become process-wide unique
// symbols, so _C_emu's table would otherwise reach _C's flag.
namespace molora {
namespace {
PyObject* py_set_value_checks(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  set_host_value_checks(on != 0);
  Py_RETURN_NONE;
}
PyMethodDef module_methods[] = {
    {"set_value_checks", &py_set_value_checks, METH_O,
     "set_value_checks(enabled: bool): host value checks in the CUDA launchers"},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace
}  // namespace molora

// Defines `PyInit_<NAME>` returning a module named NAME with set_value_checks. NAME may
// itself be a macro (e.g. TORCH_EXTENSION_NAME); it is expanded before pasting.
#define REGISTER_EXTENSION(NAME)                                              \
  PyMODINIT_FUNC MOLORA_PP_CAT(PyInit_, NAME)(void) {                         \
    static PyModuleDef molora_module_def = {                                  \
        PyModuleDef_HEAD_INIT,                                                \
        MOLORA_PP_STR(NAME), /* m_name */                                     \
        nullptr,             /* m_doc */                                      \
        0,                   /* m_size: no per-module state */                \
        molora::module_methods, /* m_methods */                               \
        nullptr,             /* m_slots */                                    \
        nullptr,             /* m_traverse */                                 \
        nullptr,             /* m_clear */                                    \
        nullptr,             /* m_free */                                     \
    };                                                                        \
    return PyModule_Create(&molora_module_def);                               \
  }
