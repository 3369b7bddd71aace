"""``python -m molora_ops.info`` reports versions and a backend for every op."""

import subprocess
import sys

import molora_ops
from molora_ops.info import op_backends


def test_info_lists_every_op_with_its_backend():
    out = subprocess.run([sys.executable, "-m", "molora_ops.info"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "triton" in out.stdout and "CUDA" in out.stdout
    for name in molora_ops.ALL_OPS:
        assert name in out.stdout
    table = op_backends()
    assert set(table) == set(molora_ops.ALL_OPS)
    expected_cpu = "C++" if molora_ops.has_extension() else "reference (PyTorch)"
    assert all(row["CPU"] == expected_cpu for row in table.values())
