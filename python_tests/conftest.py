import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # `import utils` regardless of pytest's import mode

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The flag is read when
# a `@triton.jit` function is defined, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI builds the developer build (MOLORA_DEV_BUILD=1: the CUDA-emulation module molora_ops._C_emu and
# the nvcc compile-check; .ci/run also exports MOLORA_REQUIRE_EMU=1): there a missing module or
# check fails the tests that need them instead of skipping them (emu_utils.require_emu,
# test_cuda_compile_check.py). A user install has neither; those tests skip with the reason.
if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
    os.environ.setdefault("MOLORA_REQUIRE_EMU", "1")

# Hypothesis profiles of the property tests (python_tests/test_properties.py); pick one with
# `--hypothesis-profile=NAME` (hypothesis's pytest plugin). "ci" (the default, 150 examples per
# property) stays well under a 3-minute budget on the 2-core CI machine (measured 20-75 s);
# "long" runs 10k examples per property. Every profile replays and records shrunk failures in
# python_tests/hypothesis_examples/, kept in the repo so that a failure found once (on any
# machine) is retried by every later run.
try:
    from hypothesis import HealthCheck, settings as _hsettings
    from hypothesis.database import DirectoryBasedExampleDatabase
except ImportError:  # hypothesis is a test dependency (scripts/setup.sh); without it they skip
    pass
else:
    _hcommon = dict(
        deadline=None,  # the Triton interpreter's first call of a kernel compiles it
        database=DirectoryBasedExampleDatabase(
            os.path.join(os.path.dirname(__file__), "hypothesis_examples")),
        # the autouse `seed` fixture only seeds torch's global generator, which the properties
        # do not use (they draw their own seeds)
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        print_blob=True,
    )
    _hsettings.register_profile("ci", max_examples=150, **_hcommon)
    _hsettings.register_profile("dev", max_examples=10, **_hcommon)
    _hsettings.register_profile("long", max_examples=10_000, **_hcommon)
    _hsettings.load_profile("ci")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "needs_ext: needs the native extension (torch.ops.molora)")
    config.addinivalue_line("markers", "slow: slow test (torch.compile with inductor)")
    config.addinivalue_line("markers", "triton: runs Triton kernels (interpreter without a GPU)")

    # deterministic, full-precision numerics
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    # small tensors: a couple of threads is enough and avoids oversubscription under xdist
    threads = int(os.environ.get("MOLORA_TEST_THREADS", "0")) or min(4, os.cpu_count() or 1)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        threads = 1
    torch.set_num_threads(threads)


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_ext") is not None:
        from utils import need_ext
        need_ext()
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")


@pytest.fixture(autouse=True)
def seed(request):
    """Every test gets its own fixed seed (derived from its id): fresh inputs, reproducible runs."""
    s = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    torch.manual_seed(s)
    return s


@pytest.fixture
def dynamo_reset():
    import torch._dynamo
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
