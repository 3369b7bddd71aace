"""scripts/gpu_validate.sh in its dry run (CPU stand-ins for every step: the emulated CUDA kernels,
Triton's interpreter, tiny sizes): the plumbing, the step list, summary.txt's format and the files
left in $OUT (the device tool brings back at most 8, at most 2 folders down, 16 MiB each), plus its
FAIL / TIMEOUT / budget handling, and the helpers the GPU tests and sanitizer runs share
(python_tests/gpu_compare.py, scripts/sanitize_kernels.py)."""
import importlib.util
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch

import molora_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_validate.sh")
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from gpu_compare import assert_topk_ids, cpp_cuda_ops, cuda_kernels, smem_kernels, \
    topk_tie_mismatch  # noqa: E402
import sanitize_kernels  # noqa: E402

STEPS = ["build", "gpu_tests", "bench", "layer", "memcheck", "racecheck", "triton"]
LINE = re.compile(r"^(\w+)\s+(PASS|FAIL|TIMEOUT|SKIPPED)\s+(\d+|-)\s+(\d+)\s+(.*)$")
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _need_dry_prereqs():
    if not molora_ops.has_extension():
        pytest.skip("the native extension is not built")
    if importlib.util.find_spec("molora_ops._C_emu") is None and not os.environ.get("MOLORA_EMU_LIB"):
        if os.environ.get("MOLORA_REQUIRE_EMU", "0") not in ("", "0"):
            pytest.fail("molora_ops._C_emu is not built (MOLORA_REQUIRE_EMU=1)")
        pytest.skip("the CUDA emulation module is not built")


def _run(tmp_path, timeout=300, **env):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out"
    e = dict(os.environ, OUT=str(out), PYTHON=sys.executable, TMPDIR=str(tmp_path), **env)
    for k in list(e):  # only this test's knobs
        if k.startswith("GPU_VALIDATE_") and k not in env:
            del e[k]
    p = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=timeout)
    return p, out


def _summary(out):
    text = (out / "summary.txt").read_text()
    lines = text.splitlines()
    assert lines[0].startswith("# gpu_validate mode=dry-run budget="), lines[0]
    assert lines[1].split() == ["step", "status", "secs", "limit", "notes"]
    rows = {}
    for ln in lines[2:-1]:
        m = LINE.match(ln)
        assert m, f"summary line not in the format: {ln!r}"
        rows[m.group(1)] = m.groups()[1:]
    assert list(rows) == STEPS, text
    assert re.match(r"^# result: (PASS|FAIL)$", lines[-1]), lines[-1]
    return rows, lines[-1].endswith("PASS"), text


def _check_out_layout(out):
    files = []
    for dirpath, dirnames, filenames in os.walk(out):
        rel = os.path.relpath(dirpath, out)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        assert depth <= 2, f"{dirpath}: deeper than the device tool brings back"
        for f in filenames:
            path = os.path.join(dirpath, f)
            assert NAME.match(f), f"{f!r}: a name the device tool would not bring back"
            assert os.path.getsize(path) < 16 << 20
            files.append(os.path.relpath(path, out))
    assert len(files) <= 7, files  # summary.txt + at most 6 others (the tool brings back 8)
    return sorted(files)


def test_dry_run_layout_and_summary(tmp_path):
    _need_dry_prereqs()
    p, out = _run(tmp_path)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    files = _check_out_layout(out)
    assert {"summary.txt", "logs.tgz", "router_dispatch.json", "layer.json",
            "layer_graph.json"} <= set(files) <= \
        {"summary.txt", "logs.tgz", "router_dispatch.json", "router_dispatch.png", "layer.json",
         "layer_graph.json", "layer_ncu.json"}
    rows, passed, text = _summary(out)
    assert passed and all(r[0] == "PASS" for r in rows.values()), text
    for step, (_, secs, limit, note) in rows.items():
        assert int(secs) <= int(limit) and note, (step, text)
    assert re.search(r"(\d+)/\1 csrc/cuda ops have their CPU emulation", rows["build"][3])
    assert re.search(r"\d+ passed", rows["gpu_tests"][3]) and re.search(r"\d+ passed", rows["triton"][3])
    assert re.search(r"\d+ calls ok, 0 failed", rows["memcheck"][3])
    assert re.search(r"\d+ calls ok, 0 failed", rows["racecheck"][3])
    assert re.search(r"rows \(\d+ molora\), 0 failures", rows["bench"][3])
    assert re.search(r"^\d+ rows, 0 failures;tiny T=\d+ uniform, native, fwd \d+\.\d+x base",
                     rows["layer"][3]), rows["layer"]
    # the output ends with the summary (the device tool returns the tail of the output)
    assert p.stdout.rstrip().endswith(text.rstrip())
    with tarfile.open(out / "logs.tgz") as tar:
        names = set(tar.getnames())
        assert {f"logs/{s}.log" for s in STEPS} | {"logs/env.txt", "logs/summary.txt",
                                                    "logs/router_dispatch_table.txt",
                                                    "logs/layer_table.txt",
                                                    "logs/layer_graph_table.txt"} <= names
        layer_log = tar.extractfile("logs/layer.log").read().decode()
        memcheck = tar.extractfile("logs/memcheck.log").read().decode()
        racecheck = tar.extractfile("logs/racecheck.log").read().decode()
    # the forward rows again as (on a GPU) CUDA-graph replays, one summary line per case
    assert re.search(r"^layer: graph tiny T=\d+ uniform fwd base \d+ us, native \d+\.\d+x", layer_log,
                     re.M), layer_log[-2000:]
    # the sanitizer command lines carry the kernel filters: every kernel for memcheck, the
    # shared-memory ones for racecheck
    for name, _ in cuda_kernels():
        assert f"--kernel-name kns={name}" in memcheck
    race_filters = set(re.findall(r"--kernel-name kns=(\w+)", racecheck))
    assert race_filters == set(smem_kernels()) and race_filters
    assert "--tool memcheck" in memcheck and "--tool racecheck" in racecheck


def test_dry_run_failed_build_skips_the_rest(tmp_path):
    p, out = _run(tmp_path, timeout=120, GPU_VALIDATE_STEPS="build,gpu_tests,bench",
                  GPU_VALIDATE_DRY_CMD_build="echo 'build: broken on purpose'; exit 3")
    assert p.returncode == 1, p.stdout[-3000:]
    assert _check_out_layout(out) == ["logs.tgz", "summary.txt"]
    rows, passed, text = _summary(out)
    assert not passed
    assert rows["build"][0] == "FAIL" and rows["build"][3] == "broken on purpose", text
    for s in ("gpu_tests", "bench"):
        assert rows[s][0] == "SKIPPED" and "build" in rows[s][3], text
    for s in ("layer", "memcheck", "racecheck", "triton"):
        assert rows[s][0] == "SKIPPED" and rows[s][3].startswith("not selected"), text


def test_dry_run_timeout_and_budget(tmp_path):
    p, out = _run(tmp_path, timeout=120, GPU_VALIDATE_STEPS="build",
                  GPU_VALIDATE_DRY_CMD_build="echo started; sleep 60", GPU_VALIDATE_LIMIT_build="2")
    assert p.returncode == 1
    rows, passed, text = _summary(out)
    assert rows["build"][0] == "TIMEOUT" and rows["build"][2] == "2" and int(rows["build"][1]) < 15
    assert "limit" in rows["build"][3] and not passed, text
    # a budget with no room for any step: everything skipped, still a summary and the logs
    p, out = _run(tmp_path / "b", timeout=120, GPU_VALIDATE_BUDGET_S="20")
    assert p.returncode == 1
    rows, passed, text = _summary(out)
    assert rows["build"][0] == "SKIPPED" and "out of budget" in rows["build"][3], text
    assert all(r[0] == "SKIPPED" for r in rows.values()) and not passed
    assert _check_out_layout(out) == ["logs.tgz", "summary.txt"]


FAKE_GDB = r"""#!/usr/bin/env bash
# stand-in cuda-gdb: prints its command line and a native frame
echo "fake-gdb $*"
echo "#0  0x00007f in molora::check_index_range (op=0x1) at csrc/common/check.cpp:55"
echo "#1  0x00007f in molora::dispatch_launch::dispatch_cuda () at csrc/cuda/dispatch.cu:79"
"""


def test_dry_run_crashed_worker_gets_a_native_stack(tmp_path):
    """A test that crashed its xdist worker runs again alone under the debugger; its stack goes
    into logs.tgz (crash_bt.log) and its innermost frame onto the console."""
    gdb = tmp_path / "fake-gdb"
    gdb.write_text(FAKE_GDB)
    gdb.chmod(0o755)
    crash = ("echo \"FAILED python_tests/test_cuda_kernels_dispatch.py::test_errors_cuda\"; "
             "echo \"[gw3] node down: Not properly terminated\"; "
             "echo \"worker 'gw3' crashed while running "
             "'python_tests/test_cuda_kernels_dispatch.py::test_errors_cuda'\"; exit 1")
    p, out = _run(tmp_path / "run", timeout=120, GPU_VALIDATE_STEPS="build,gpu_tests",
                  GPU_VALIDATE_DRY_CMD_build="echo 'build: stand-in'",
                  GPU_VALIDATE_DRY_CMD_gpu_tests=crash, GPU_VALIDATE_GDB=str(gdb))
    assert p.returncode == 1, p.stdout[-3000:]
    rows, passed, text = _summary(out)
    assert rows["gpu_tests"][0] == "FAIL" and not passed, text
    with tarfile.open(out / "logs.tgz") as tar:
        bt = tar.extractfile("logs/crash_bt.log").read().decode()
    assert "== gpu_tests: python_tests/test_cuda_kernels_dispatch.py::test_errors_cuda" in bt, bt
    assert re.search(r"fake-gdb -q -batch .*-ex run -ex bt .*--args \S+ -m pytest .*-p no:xdist "
                     r"python_tests/test_cuda_kernels_dispatch.py::test_errors_cuda$", bt, re.M), bt
    assert "crash_bt: #0  0x00007f in molora::check_index_range" in p.stdout, p.stdout[-3000:]
    # no crash, no rerun: the plain failure of a step leaves no crash_bt.log
    p, out = _run(tmp_path / "plain", timeout=120, GPU_VALIDATE_STEPS="build,gpu_tests",
                  GPU_VALIDATE_DRY_CMD_build="echo 'build: stand-in'",
                  GPU_VALIDATE_DRY_CMD_gpu_tests="echo 'FAILED x.py::t'; exit 1",
                  GPU_VALIDATE_GDB=str(gdb))
    with tarfile.open(out / "logs.tgz") as tar:
        assert "logs/crash_bt.log" not in tar.getnames()
    assert "fake-gdb" not in p.stdout


FAKE_SANITIZER = r"""#!/usr/bin/env bash
# stand-in compute-sanitizer: refuses repeated --kernel-name filters, else runs the program
echo "fake-sanitizer $*"
n=$(printf '%s\n' "$@" | grep -c '^--kernel-name$')
if [ "$n" -gt 1 ]; then echo "fake-sanitizer: --kernel-name given $n times"; exit 9; fi
[ "$1" = --version ] && exit 0
while [ $# -ge 2 ] && [ "${1#--}" != "$1" ]; do shift 2; done
"$@"
rc=$?
echo "========= ERROR SUMMARY: 0 errors"
exit $rc
"""


def test_dry_run_sanitizer_command_and_filter_fallback(tmp_path):
    # the GPU-mode sanitizer path with a stand-in compute-sanitizer that refuses repeated
    # --kernel-name filters: the step reruns with the single filter kns=molora and passes
    _need_dry_prereqs()
    fake = tmp_path / "fake-sanitizer"
    fake.write_text(FAKE_SANITIZER)
    fake.chmod(0o755)
    p, out = _run(tmp_path, timeout=200, GPU_VALIDATE_STEPS="racecheck",
                  GPU_VALIDATE_SANITIZER=str(fake))
    rows, passed, text = _summary(out)
    assert p.returncode == 0 and passed, text + p.stdout[-3000:]
    assert rows["racecheck"][0] == "PASS", text
    assert rows["racecheck"][3].startswith("ERROR SUMMARY: 0 errors;"), text
    assert rows["racecheck"][3].endswith("one filter kns=molora"), text
    with tarfile.open(out / "logs.tgz") as tar:
        log = tar.extractfile("logs/racecheck.log").read().decode()
    assert "fake-sanitizer: --kernel-name given" in log
    assert re.search(r"fake-sanitizer --tool racecheck --error-exitcode 1 .*--kernel-name kns=molora "
                     r"\S+ scripts/sanitize_kernels.py --emulate --quick --smem-only", log), log


# --- the helpers --------------------------------------------------------------------------------


def test_sources_scan_and_filters():
    ops = cpp_cuda_ops()
    assert {"softmax_topk", "dispatch", "gather_rows", "rank_topk", "id_histogram"} <= set(ops)
    from molora_ops.ops import ALL_OPS
    assert set(ops) <= set(ALL_OPS)
    kernels = dict(cuda_kernels())
    assert kernels and set(smem_kernels()) == {k for k, smem in kernels.items() if smem}
    # every shared-memory kernel is reached by an op the racecheck run calls
    covered = {k for ks in sanitize_kernels.SMEM_OPS.values() for k in ks}
    assert set(smem_kernels()) <= covered and set(sanitize_kernels.SMEM_OPS) <= set(ops)
    assert set(covered) <= set(kernels)
    assert sanitize_kernels.smem_ops() == [o for o in ops if o in sanitize_kernels.SMEM_OPS]
    race = sanitize_kernels.kernel_filter("racecheck")
    assert race[::2] == ["--kernel-name"] * len(smem_kernels())
    assert [a.split("=", 1)[1] for a in race[1::2]] == list(smem_kernels())
    assert len(sanitize_kernels.kernel_filter("memcheck")) == 2 * len(kernels)


def test_topk_tie_mismatch():
    key = torch.tensor([[3.0, 5.0, 5.0, 1.0, 5.0],
                        [1.0, 2.0, 3.0, 4.0, 5.0],
                        [2.0, 2.0, 1.0, 0.0, 2.0],
                        [9.0, 1.0, 1.0, 1.0, 0.0]])
    ref = torch.tensor([[1, 2, 4], [4, 3, 2], [0, 1, 4], [0, 1, -1]], dtype=torch.int32)
    ours = torch.tensor([[4, 1, 2],    # the tied 5s in another order: fine
                         [4, 3, 1],    # 2 instead of 3: a different value
                         [0, 0, 4],    # a duplicate id
                         [0, 3, -1]],  # a tied 1 in another slot, -1 at the same slot
                        dtype=torch.int32)
    assert topk_tie_mismatch(ours, ref, key).tolist() == [False, True, True, False]
    assert not topk_tie_mismatch(ref, ref, key).any()
    bad = ours.clone()
    bad[3] = torch.tensor([0, -1, 3])  # -1 at another slot
    assert topk_tie_mismatch(bad, ref, key).tolist()[3]
    counts = assert_topk_ids(ours[[0, 3]], ref[[0, 3]], key[[0, 3]], exact=False)
    assert counts == {"rows": 2, "differ": 2, "beyond_ties": 0}
    with pytest.raises(AssertionError, match="2 of 2 rows differ.*2 of them only in the order of tied"):
        assert_topk_ids(ours[[0, 3]], ref[[0, 3]], key[[0, 3]])  # exact: our stable reference
    with pytest.raises(AssertionError, match="1 select different values"):
        assert_topk_ids(ours[:2], ref[:2], key[:2], exact=False)
    empty = torch.zeros(0, 3, dtype=torch.int32)
    assert topk_tie_mismatch(empty, empty, torch.zeros(0, 5)).numel() == 0


def test_sanitize_kernels_emulated_subset(capsys):
    _need_dry_prereqs()
    assert sanitize_kernels.main(["--emulate", "--quick", "--ops", "id_histogram,dispatch"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"sanitize_kernels: \d+ calls ok, 0 failed", out), out
    assert sanitize_kernels.main(["--emulate", "--ops", "no_such_op"]) == 2


def test_ncu_layer_report_groups_kernels_by_stream(tmp_path):
    """scripts/ncu_layer.py --report on a log in ncu's --csv format (one row per kernel and
    metric, numbers with thousands separators, the profiler's own lines mixed in): kernels go to
    the formulations by stream in the order the streams first appear, bytes are summed against
    molora_ops.plan's planned and minimum bytes."""
    import ncu_layer
    from molora_ops import plan

    head = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
            '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
            '"Metric Value"')
    # (id, stream, kernel, read bytes, write bytes, ns)
    kernels = [(0, 13, "sm90_gemm", 70_000_000, 33_000_000, 90_000),
               (1, 14, "dispatch_kernel", 200_000, 100_000, 5_000),
               (2, 14, "sgmv_shrink", 68_000_000, 300_000, 40_000),
               (3, 14, "sgmv_expand", 35_000_000, 33_500_000, 30_000),
               (4, 15, "fused_moe_lora", 67_000_000, 33_600_000, 35_000)]
    lines = ["==PROF== Connected to process 1", "ncu_layer: profiled", head]
    for i, st, name, rd, wr, ns in kernels:
        for metric, unit, v in (("dram__bytes_read.sum", "byte", rd),
                                ("dram__bytes_write.sum", "byte", wr),
                                ("gpu__time_duration.sum", "nsecond", ns)):
            lines.append(f'"{i}","1","python3","h","{name}","1","{st}","(256, 1, 1)","(9, 1, 1)",'
                         f'"0","9.0","Command line profiler metrics","{metric}","{unit}","{v:,}"')
    csv_path, order = tmp_path / "ncu.csv", tmp_path / "order"
    csv_path.write_text("\n".join(lines) + "\n")
    order.write_text("base_linear grouped fused\n")
    out = ncu_layer.report(str(csv_path), str(order), str(tmp_path / "ncu.json"))
    shape = ncu_layer._shape()
    rows = out["rows"]
    assert list(rows) == ["base_linear", "grouped", "fused"]
    assert rows["grouped"]["kernels"] == ["dispatch_kernel", "sgmv_shrink", "sgmv_expand"]
    g = rows["grouped"]
    assert g["dram_read"] == 103_200_000 and g["dram_write"] == 33_900_000
    planned = sum(l.bytes for l in plan.launches("grouped", shape))
    assert g["x_planned"] == pytest.approx(137_100_000 / planned)
    assert g["x_minimum"] == pytest.approx(137_100_000 / plan.minimum_bytes(shape))
    assert rows["fused"]["kernel_us"] == 35.0
    assert rows["fused"]["x_base_kernels"] == pytest.approx((35 + 90) / 90)
    assert (tmp_path / "ncu.json").exists()
    order.write_text("base_linear grouped dense fused\n")  # a window without kernels: an error
    with pytest.raises(SystemExit, match="3 streams"):
        ncu_layer.report(str(csv_path), str(order))


def test_ncu_layer_run_calls_every_formulation(tmp_path):
    """scripts/ncu_layer.py's profiled program at a small shape on the CPU (no profiler windows
    there): the base linear and every formulation that runs here, in the order it writes."""
    import ncu_layer
    from molora_ops import plan

    shape = plan.Layer(T=40, d_in=24, d_out=20, E=3, k=2, R=12, max_rank=4, elem=2)
    ncu_layer.run(str(tmp_path / "order"), device="cpu", shape=shape)
    order = (tmp_path / "order").read_text().split()
    assert order[:3] == ["base_linear", "grouped", "dense"]  # fused: Triton on CUDA only
