"""Build driver for molora_ops: setuptools runs CMake (Ninja) to build molora_ops._C.

The native sources are listed ONLY in CMakeLists.txt. Build with the environment's torch:

    pip install --no-build-isolation -e .     # editable (developers, CI)
    pip install --no-build-isolation .        # regular install

Environment:
    MOLORA_SKIP_EXT=1        pure-Python install, no molora_ops._C
    MAX_JOBS=N               parallel compile jobs (default: number of CPUs)
    CMAKE_ARGS="..."         extra arguments for the CMake configure step (override ours)
    MOLORA_CUDA_CHECK=OFF    with a CPU torch, do not compile-check the .cu sources with nvcc
    TORCH_CUDA_ARCH_LIST     with a CUDA torch, target architectures (default "9.0")
    CUDA_HOME                CUDA toolkit root (default: found from the nvcc on PATH)
    MOLORA_BUILD_DIR         CMake build directory (default: build/cmake-<platform>-<python>)
    MOLORA_BUILD_EMU=0       do not build molora_ops._C_emu (CPU emulation of the CUDA kernels,
                             test-only; built by default)
"""

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str, default: str = "") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "on", "true", "yes")


SKIP_EXT = _env_flag("MOLORA_SKIP_EXT")
# The second extension module, molora_ops._C_emu (CPU emulation of the CUDA kernels, tests), comes out of the same CMake build (target _C_emu); MOLORA_BUILD_EMU=0 skips it.
BUILD_EMU = _env_flag("MOLORA_BUILD_EMU", "1")

if not SKIP_EXT:
    try:
        import torch  # noqa: F401  (the build compiles against this torch)
    except ImportError as exc:  # fail fast, before any build work
        sys.exit(
            f"molora_ops: cannot import torch ({exc}).\n"
            "Building molora_ops._C needs PyTorch already installed in this environment:\n"
            "    pip install torch ninja 'cmake>=3.26,<4' setuptools wheel\n"
            "    pip install --no-build-isolation -e .\n"
            "(--no-build-isolation lets the build see that torch; torch is deliberately not a build\n"
            "requirement.) Set MOLORA_SKIP_EXT=1 for a pure-Python install without the extension."
        )


def _tool(name: str) -> str | None:
    """A build tool from this interpreter's environment first (venv not activated), then PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def _real_nvcc(nvcc: str) -> str:
    """Resolve a wrapper script (e.g. /usr/local/bin/nvcc doing `exec .../bin/nvcc "$@"`) to the
    toolkit's own nvcc, so that CMake and torch derive the right toolkit root from it."""
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            if f.read(4) == b"\x7fELF":
                return real
    except OSError:
        return nvcc
    # nvcc's dry run prints `#$ _HERE_=<directory of the real nvcc>`.
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
        for line in (out.stdout + out.stderr).splitlines():
            if "_HERE_=" in line:
                here = line.split("_HERE_=", 1)[1].strip()
                if (Path(here) / "nvcc").is_file():
                    return str(Path(here) / "nvcc")
    except (OSError, subprocess.SubprocessError):
        pass
    return nvcc


def _find_nvcc() -> str | None:
    if os.environ.get("CUDACXX"):
        return _real_nvcc(os.environ["CUDACXX"])
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return _real_nvcc(str(Path(root) / "bin" / "nvcc"))
    nvcc = shutil.which("nvcc")
    return _real_nvcc(nvcc) if nvcc else None


class CMakeExtension(Extension):
    """An extension whose sources CMakeLists.txt owns."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        # The CMake configure + build runs once, for the first CMakeExtension; the
        # calls for the other modules (molora_ops._C_emu) only copy what it produced.
        lib_dir = getattr(self, "_molora_lib_dir", None)
        if lib_dir is None:
            lib_dir = self._molora_lib_dir = self._cmake_build()
        self._copy_module(ext, lib_dir)

    def _cmake_build(self) -> Path:
        import torch

        cmake = _tool("cmake")
        ninja = _tool("ninja")
        if cmake is None or ninja is None:
            sys.exit("molora_ops: cmake>=3.26 and ninja are needed: pip install ninja 'cmake>=3.26,<4'")

        build_dir = Path(
            os.environ.get("MOLORA_BUILD_DIR")
            or ROOT / "build" / f"cmake-{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        ).resolve()
        lib_dir = build_dir / "lib"
        build_dir.mkdir(parents=True, exist_ok=True)

        torch_cuda = torch.version.cuda is not None
        user_args = shlex.split(os.environ.get("CMAKE_ARGS", ""))
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DTorch_DIR={Path(torch.utils.cmake_prefix_path) / 'Torch'}",
            f"-DMOLORA_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DMOLORA_TORCH_CUDA={'ON' if torch_cuda else 'OFF'}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={lib_dir}",
            f"-DMOLORA_BUILD_EMU={'ON' if BUILD_EMU else 'OFF'}",  # _C_emu
        ]
        want_cuda = torch_cuda or _env_flag("MOLORA_CUDA_CHECK", "1")
        if want_cuda and not any(a.startswith("-DCMAKE_CUDA_COMPILER") for a in user_args):
            nvcc = _find_nvcc()
            if nvcc:
                args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        args += user_args

        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        print("molora_ops: " + shlex.join(args), flush=True)
        subprocess.run(args, check=True, env=env)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True, env=env)
        return lib_dir

    def _copy_module(self, ext: Extension, lib_dir: Path) -> None:
        # Put the module where setuptools wants it (build_lib for a wheel; for an editable install
        # setuptools then copies it next to molora_ops/__init__.py in the source tree).
        name = ext.name.split(".")[-1] + sysconfig.get_config_var("EXT_SUFFIX")
        built = lib_dir / name
        if not built.is_file():
            found = sorted(p.name for p in lib_dir.glob("_C*")) if lib_dir.is_dir() else []
            if ext.name == "molora_ops._C_emu":
                sys.exit(f"molora_ops: CMake did not produce {built} (found: {found}); "
                         "set MOLORA_BUILD_EMU=0 to build without the CUDA emulation module")
            sys.exit(f"molora_ops: CMake did not produce {built} (found: {found})")
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copy2(built, tmp)
        os.replace(tmp, dest)  # atomic: never truncate a .so another process has mapped


setup(
    packages=find_packages(include=["molora_ops", "molora_ops.*"]),
    ext_modules=[] if SKIP_EXT else (
        [CMakeExtension("molora_ops._C")] + ([CMakeExtension("molora_ops._C_emu")] if BUILD_EMU else [])
    ),
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
