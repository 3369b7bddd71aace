"""The native modules share the process's C++ runtime (libstdc++.so.6) instead of carrying a
static copy (cmake/SharedLibstdcxx.cmake). A copy inside _C crashed the first error message
formatted there, on a machine image whose compiler had libstdc++.a but not the development link
libstdc++.so. Here: the built modules' NEEDED entries, and the CMake function on a tiny module
built against a library path that offers only libstdc++.a (that image's situation), without and
with the function."""

import os
import shutil
import subprocess
import textwrap

import pytest

import molora_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _needed(path: str) -> list:
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return [ln.split("[", 1)[1].rstrip("]") for ln in out.splitlines() if "(NEEDED)" in ln]


def _gcc_linux() -> bool:
    if not shutil.which("readelf") or not shutil.which("g++") or not shutil.which("cmake"):
        return False
    return os.uname().sysname == "Linux"


@pytest.mark.skipif(not _gcc_linux(), reason="GCC toolchain on Linux (readelf, g++, cmake)")
def test_built_modules_need_the_shared_cxx_runtime():
    pkg = os.path.dirname(molora_ops.__file__)
    mods = [os.path.join(pkg, f) for f in os.listdir(pkg)
            if f.startswith(("_C.", "_C_emu.")) and f.endswith(".so")]
    if not mods:
        pytest.skip("no native module built")
    for path in mods:
        assert "libstdc++.so.6" in _needed(path), (path, _needed(path))


PROJECT = textwrap.dedent("""
    cmake_minimum_required(VERSION 3.18)
    project(cxxrt CXX)
    include("{root}/cmake/SharedLibstdcxx.cmake")
    add_library(m MODULE m.cpp)
    # the search path of that image: the compiler's libstdc++.a with no libstdc++.so beside it
    target_link_options(m PRIVATE "-L{archive_dir}")
    if(FIX)
      molora_link_shared_libstdcxx(m)
    endif()
""")

SOURCE = textwrap.dedent("""
    #include <sstream>
    #include <string>
    std::string describe(long v) {
      std::ostringstream ss;
      ss << "value " << v;
      return ss.str();
    }
""")


def _build(tmp_path, fix: bool) -> str:
    src, build = tmp_path / "src", tmp_path / f"build{int(fix)}"
    archive_dir = tmp_path / "archive_only"
    if not archive_dir.exists():
        archive = subprocess.run(["g++", "-print-file-name=libstdc++.a"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        if not os.path.isabs(archive):
            pytest.skip("g++ has no libstdc++.a")
        archive_dir.mkdir()
        os.symlink(archive, archive_dir / "libstdc++.a")
    src.mkdir(exist_ok=True)
    (src / "CMakeLists.txt").write_text(PROJECT.format(root=ROOT, archive_dir=archive_dir))
    (src / "m.cpp").write_text(SOURCE)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    for cmd in (["cmake", "-S", str(src), "-B", str(build), f"-DFIX={'ON' if fix else 'OFF'}",
                 "-DCMAKE_CXX_COMPILER=g++", *gen],
                ["cmake", "--build", str(build)]):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (lib,) = [f for f in os.listdir(build) if f.endswith(".so")]
    return str(build / lib)


@pytest.mark.skipif(not _gcc_linux(), reason="GCC toolchain on Linux (readelf, g++, cmake)")
def test_cmake_function_keeps_the_archive_out(tmp_path):
    static = _build(tmp_path, fix=False)
    # the setting reproduces that image: g++'s own -lstdc++ takes the archive
    assert "libstdc++.so.6" not in _needed(static), _needed(static)
    fixed = _build(tmp_path, fix=True)
    assert "libstdc++.so.6" in _needed(fixed), _needed(fixed)
    syms = subprocess.run(["nm", "-C", "--defined-only", fixed], capture_output=True,
                          text=True, check=True).stdout
    assert "std::locale::locale()" not in syms
