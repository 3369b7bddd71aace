// Python module entry point for molora_ops._C.
//
// The extension has no Python-level functions: all ops are registered with the
// PyTorch dispatcher by static TORCH_LIBRARY / TORCH_LIBRARY_IMPL initialisers.
// Importing the shared object (`import molora_ops._C`) is what runs those
// initialisers, so the module itself only needs to exist. No pybind11, no
// libtorch_python: just the CPython C API.
//
// Usage (exactly once, in one translation unit of the extension):
//   #include "registration.h"
//   REGISTER_EXTENSION(TORCH_EXTENSION_NAME)   // -> PyInit__C
#pragma once

#include <Python.h>

#define MOLORA_PP_CAT_IMPL(a, b) a##b
#define MOLORA_PP_CAT(a, b) MOLORA_PP_CAT_IMPL(a, b)
#define MOLORA_PP_STR_IMPL(x) #x
#define MOLORA_PP_STR(x) MOLORA_PP_STR_IMPL(x)

// Defines `PyInit_<NAME>` returning an empty module named NAME. NAME may itself
// be a macro (e.g. TORCH_EXTENSION_NAME); it is expanded before pasting.
#define REGISTER_EXTENSION(NAME)                                              \
  PyMODINIT_FUNC MOLORA_PP_CAT(PyInit_, NAME)(void) {                         \
    static PyModuleDef molora_module_def = {                                  \
        PyModuleDef_HEAD_INIT,                                                \
        MOLORA_PP_STR(NAME), /* m_name */                                     \
        nullptr,             /* m_doc */                                      \
        0,                   /* m_size: no per-module state */                \
        nullptr,             /* m_methods */                                  \
        nullptr,             /* m_slots */                                    \
        nullptr,             /* m_traverse */                                 \
        nullptr,             /* m_clear */                                    \
        nullptr,             /* m_free */                                     \
    };                                                                        \
    return PyModule_Create(&molora_module_def);                               \
  }
