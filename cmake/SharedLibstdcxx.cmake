# molora_link_shared_libstdcxx(<target>): link <target> against the shared C++ runtime that
# Python and torch load (libstdc++.so.6), by its full path.
#
# Why: g++ adds -lstdc++ at the end of every link, and the linker takes the first libstdc++.so or
# libstdc++.a it meets on its search path. On an image that has the runtime (libstdc++.so.6) but
# not the development link libstdc++.so next to the compiler's libstdc++.a, that is the archive:
# the module then carries a second, private C++ runtime (NEEDED lacks libstdc++.so.6), and the
# first error message formatted in it (ostream << long inside c10::str) crashed the process on a
# GPU machine image. With the runtime named before, the archive has nothing left to add.
# GCC on Linux only (clang / libc++ and other platforms are left as they are).
function(molora_link_shared_libstdcxx target)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "GNU" OR NOT CMAKE_SYSTEM_NAME STREQUAL "Linux")
    return()
  endif()
  execute_process(COMMAND "${CMAKE_CXX_COMPILER}" -print-file-name=libstdc++.so.6
                  OUTPUT_VARIABLE _molora_rt OUTPUT_STRIP_TRAILING_WHITESPACE
                  RESULT_VARIABLE _molora_rc)
  if(_molora_rc EQUAL 0 AND IS_ABSOLUTE "${_molora_rt}" AND EXISTS "${_molora_rt}")
    get_filename_component(_molora_rt "${_molora_rt}" ABSOLUTE)
    target_link_libraries(${target} PRIVATE "${_molora_rt}")
  else()
    message(WARNING "molora_ops: ${CMAKE_CXX_COMPILER} does not find libstdc++.so.6; ${target} "
                    "may link a static copy of the C++ runtime")
  endif()
endfunction()
