"""bench/overhead.py plumbing with tiny repeat counts: every op and variant present, timings
finite and positive, the table and JSON written. Never asserts on the times themselves."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # import bench

from bench import overhead as ov  # noqa: E402
from bench import report  # noqa: E402

TINY = ["--repeats", "2", "--calls", "3", "--warmup", "1"]


def _check_structure(res, ops=ov.OPS):
    assert res["schema"] == ov.SCHEMA
    assert res["config"]["tokens"] == 1 and res["config"]["target_us"] == ov.TARGET_US
    assert [(r["op"], r["variant"]) for r in res["rows"]] == [
        (op, v) for op in ops for v in ov.VARIANTS]
    for r in res["rows"]:
        for clock in ("time_us", "cpu_time_us"):
            t = r[clock]
            assert set(t) == {"median_us", "p20_us", "p80_us", "min_us", "max_us", "n"}
            assert t["n"] == res["config"]["repeats"]
            assert all(math.isfinite(t[k]) and t[k] > 0 for k in t if k != "n")
            assert t["min_us"] <= t["p20_us"] <= t["median_us"] <= t["p80_us"] <= t["max_us"]
        for key in ("overhead_us", "cpu_overhead_us"):
            if r["variant"] == "direct":
                assert r[key] is None
            else:  # noise can make an overhead negative: finite is all that holds
                assert math.isfinite(r[key])
        assert r["same_outputs_as_direct"] is True  # the direct call runs the same kernel
        assert r["call"] and r["shape"] == ov.SHAPES[r["op"]]
    assert [s["op"] for s in res["summary"]] == list(ops)
    for s in res["summary"]:
        assert set(s["overhead_us"]) == set(s["cpu_overhead_us"]) == set(ov.VARIANTS[:-1])
        assert all(math.isfinite(v) for v in [*s["overhead_us"].values(),
                                              *s["cpu_overhead_us"].values()])
        assert math.isfinite(s["max_overhead_us"]) and math.isfinite(s["cpu_max_overhead_us"])
        assert s["direct_us"] > 0 and s["cpu_direct_us"] > 0
        assert isinstance(s["meets_target"], bool)
    assert isinstance(res["meets_target"], bool)


def test_measure_structure():
    import torch
    threads = torch.get_num_threads()
    res = ov.measure(repeats=2, calls=3, warmup=1)
    assert torch.get_num_threads() == threads  # restored
    _check_structure(res)
    text = ov.table(res)
    for op in ov.OPS:
        assert op in text
    json.dumps(res, allow_nan=False)


def test_cli_writes_json(tmp_path, capsys):
    path = tmp_path / "sub" / "overhead.json"
    assert ov.main(TINY + ["--json", str(path)]) == 0
    res = json.loads(path.read_text())
    _check_structure(res)
    assert res["meta"]["threads"] == 1 and res["meta"]["argv"][-1] == str(path)
    out = capsys.readouterr().out
    assert "per-call overhead" in out and "sgmv_shrink" in out


def test_cli_op_subset_and_bad_args(capsys):
    assert ov.main(TINY + ["--ops", "dispatch,rank_topk"]) == 0
    assert "rank_topk" in capsys.readouterr().out
    for bad in (["--ops", "nope"], ["--calls", "0"]):
        with pytest.raises(SystemExit):
            ov.parse_args(bad)


def test_section_in_main_table():
    res = ov.measure(repeats=1, calls=2, warmup=0, ops=("softmax_topk",))
    _check_structure(res, ops=("softmax_topk",))
    results = {"meta": {"device_type": "cpu", "device": "cpu", "dtype": "float32",
                        "preset": "tiny", "torch": "x"},
               "ceilings": {"copy_gb_per_s": 1.0, "matmul_gflop_per_s": 1.0,
                            "matmul_dtype": "float32", "matmul_n": 8},
               "rows": [], "skipped": [], "overhead": res}
    assert "per-call overhead" in report.table(results)
    assert "per-call overhead" not in report.table({**results, "overhead": None})
