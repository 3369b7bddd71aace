"""Build driver for molora_ops: setuptools runs CMake (Ninja) to build molora_ops._C.

The native sources are listed ONLY in CMakeLists.txt. Build against the environment's torch:

    pip install --no-build-isolation .        # users: the C++ CPU kernels (+ CUDA with a CUDA torch)
    pip install --no-build-isolation -e .     # editable
    MOLORA_DEV_BUILD=1 pip install --no-build-isolation -e .   # developers / CI (scripts/setup.sh)

A plain ``pip install .`` builds in pip's isolated environment, which has no torch: that gives the
pure-Python package (reference + Triton kernels) and says how to get the native kernels.

Environment:
    MOLORA_DEV_BUILD=1       developer / CI build: also the test-only molora_ops._C_emu and (CPU torch
                             + nvcc) the nvcc compile-check of the .cu sources; a missing torch fails
    MOLORA_BUILD_EMU=0|1     build molora_ops._C_emu, the CPU emulation of the CUDA kernels (tests);
                             default: MOLORA_DEV_BUILD
    MOLORA_CUDA_CHECK=0|1    CPU torch + nvcc: compile-check the .cu sources; default: MOLORA_DEV_BUILD
    MOLORA_SKIP_EXT=1        pure-Python install, no molora_ops._C
    MOLORA_REQUIRE_EXT=1     fail (instead of a pure-Python install) when torch is not importable;
                             implied by MOLORA_DEV_BUILD
    MAX_JOBS=N               parallel compile jobs (default: number of CPUs)
    CMAKE_ARGS="..."         extra arguments for the CMake configure step (override ours)
    TORCH_CUDA_ARCH_LIST     with a CUDA torch, target architectures (default "9.0")
    CUDA_HOME                CUDA toolkit root (default: found from the nvcc on PATH)
    MOLORA_BUILD_DIR         CMake build directory (default: build/cmake-<platform>-<python>)
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
MIN_CMAKE = (3, 26)


def _env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value in ("1", "on", "true", "yes")


def _tty(line: str) -> None:
    """pip captures the build's output (it shows it with -v or on failure): progress lines also
    go to the terminal when there is one, so a minute-long build is not silent."""
    if sys.stdout.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(line + "\n")
    except OSError:  # no controlling terminal (CI, IDEs): the captured output is all there is
        pass


def _say(msg: str) -> None:
    """A stage line: on stdout, and on the terminal under pip."""
    line = f"molora_ops: {msg}"
    print(line, flush=True)
    _tty(line)


def _run_ninja(cmd: list, env: dict) -> None:
    """Runs the build, echoing its output; ninja's "[k/N] ..." steps also go to the terminal."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        if re.match(r"\[\d+/\d+\] ", line):
            _tty("molora_ops:   " + line.rstrip()[:150])
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


DEV_BUILD = _env_flag("MOLORA_DEV_BUILD")
# The test-only CUDA emulation module and the nvcc compile-check: developer / CI switches.
BUILD_EMU = _env_flag("MOLORA_BUILD_EMU", DEV_BUILD)
CUDA_CHECK = _env_flag("MOLORA_CUDA_CHECK", DEV_BUILD)
SKIP_EXT = _env_flag("MOLORA_SKIP_EXT")
REQUIRE_EXT = _env_flag("MOLORA_REQUIRE_EXT", DEV_BUILD)

if not SKIP_EXT:
    try:
        import torch  # noqa: F401  (the build compiles against this torch)
    except ImportError as exc:
        if REQUIRE_EXT:  # developers / CI: fail fast, before any build work
            sys.exit(
                f"molora_ops: cannot import torch ({exc}); the native build needs the environment's "
                "torch: pip install torch, then pip install --no-build-isolation -e ."
            )
        # pip's build isolation (a plain `pip install .`): no torch to compile against. Build the
        # pure-Python package, which works (reference on CPU, Triton kernels on CUDA).
        SKIP_EXT = True
        building = {"bdist_wheel", "build_ext", "editable_wheel", "build", "install", "develop"}
        if building & set(sys.argv[1:]):  # not for an sdist or the metadata steps
            _say("torch is not importable in this build environment (pip's build isolation?): "
                 "installing the pure-Python package (reference + Triton kernels). For the native "
                 "kernels: pip install --no-build-isolation .")


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


def _version_of(tool: str) -> tuple:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(g) for g in m.groups() if g is not None) if m else ()


def _build_tools() -> tuple:
    """cmake >= 3.26 and ninja, or exit with ONE line saying what to install."""
    cmake, ninja = _tool("cmake"), _tool("ninja")
    fix = "pip install 'cmake>=3.26,<4' ninja"
    if cmake is None or ninja is None:
        missing = " and ".join(n for n, t in (("cmake", cmake), ("ninja", ninja)) if t is None)
        sys.exit(f"molora_ops: {missing} not found; the native build needs cmake>=3.26 and ninja: {fix}")
    version = _version_of(cmake)
    if version[:2] < MIN_CMAKE:
        found = ".".join(map(str, version)) or "unknown version"
        sys.exit(f"molora_ops: {cmake} is cmake {found}, the native build needs cmake>=3.26: {fix}")
    return cmake, ninja


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

        cmake, ninja = _build_tools()

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
            f"-DMOLORA_CUDA_CHECK={'ON' if CUDA_CHECK else 'OFF'}",
        ]
        want_cuda = torch_cuda or CUDA_CHECK
        if want_cuda and not any(a.startswith("-DCMAKE_CUDA_COMPILER") for a in user_args):
            nvcc = _find_nvcc()
            if nvcc:
                args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        args += user_args

        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # CMake reads these too (a bare `cmake -S .`); ours are already decided above.
        env.pop("MOLORA_CUDA_CHECK", None)
        env.pop("MOLORA_BUILD_EMU", None)
        what = ["_C (C++ CPU kernels" + (" + CUDA kernels)" if torch_cuda else ")")]
        if BUILD_EMU:
            what.append("_C_emu (test-only)")
        if CUDA_CHECK and not torch_cuda:
            what.append("nvcc compile-check of the .cu files (if nvcc is found)")
        t0 = time.monotonic()
        _say(f"[1/2] configuring {', '.join(what)} with CMake in {build_dir} "
             f"(torch {torch.__version__}){'; developer build' if DEV_BUILD else ''}")
        print("molora_ops: " + shlex.join(args), flush=True)
        subprocess.run(args, check=True, env=env)
        _say(f"[2/2] compiling with ninja, {jobs} jobs (about 1 minute on 2 cores for the CPU "
             "kernels; pip -v shows each step)")
        _run_ninja([cmake, "--build", str(build_dir), "-j", jobs], env)
        _say(f"native build done in {time.monotonic() - t0:.0f} s")
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
