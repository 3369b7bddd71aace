"""bench/router_dispatch_gpu.py on the CPU: byte models, argument parsing, the torch baselines
against the reference, and a tiny smoke run (no GPU timing here)."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # import bench

from bench import router_dispatch_gpu as rd  # noqa: E402
from molora_ops import reference as ref  # noqa: E402


def test_byte_models():
    T, E, k, d = 16384, 64, 8, 4096
    P = T * k
    assert rd.router_bytes(T, E, k) == T * E * 2 + T * k * 8
    assert rd.router_bytes(T, E, k, logit_bytes=4) == T * E * 4 + T * k * 8
    assert rd.dispatch_bytes(T, k, E) == P * 4 + 2 * P * 4 + (E + 1) * 4
    assert rd.gather_bytes(T, k, d) == T * d * 2 + 2 * P * 4 + P * d * 2
    assert rd.combine_bytes(T, k, d) == P * d * 2 + 2 * P * 4 + T * d * 2
    assert rd.combine_bytes(T, k, d, weighted=False) == P * d * 2 + P * 4 + T * d * 2
    # gather/combine at d = 4096 are dominated by the P rows: ~ (k + 1) * T * d * 2 bytes
    assert abs(rd.gather_bytes(T, k, d) / ((k + 1) * T * d * 2) - 1) < 1e-3
    assert rd.gb_per_s(2_000_000_000, 1.0) == 2.0


def test_parse_args_defaults_and_quick():
    a = rd.parse_args(["--out", "/tmp/x", "--device", "cpu"])
    assert (a.tokens, a.experts, a.topk, a.hidden) == (16384, [8, 60, 64, 256], [2, 8], 4096)
    assert a.benches == list(rd.BENCHES) and a.budget == 0.2 and a.device == "cpu"
    q = rd.parse_args(["--out", "/tmp/x", "--quick", "--experts", "7,9", "--benches",
                       "router,combine", "-T", "33"])
    assert (q.tokens, q.experts, q.topk, q.hidden, q.benches) == (33, [7, 9], [2], 64,
                                                                   ["router", "combine"])


@pytest.mark.parametrize("argv", [[], ["--out", "x", "--experts", "8,a"],
                                  ["--out", "x", "--topk", "0"], ["--out", "x", "--benches", "sort"],
                                  ["--out", "x", "--budget", "-1"]])
def test_parse_args_errors(argv):
    with pytest.raises(SystemExit):
        rd.parse_args(argv)


def test_baselines_match_reference():
    T, E, k = 50, 7, 3
    logits = torch.randn(T, E)
    w, ids = rd.torch_router(logits, k)
    w_ref, ids_ref = ref.softmax_topk(logits, k, True)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref)
    order, pos, offsets = rd.torch_sort_dispatch(ids, E)
    o_ref, p_ref, e_ref = ref.dispatch(ids, E, 1)
    assert torch.equal(order, o_ref) and torch.equal(pos, p_ref) and torch.equal(offsets, e_ref)
    y_perm = torch.randn(T * k, 16)
    y = rd.torch_combine(y_perm, order.long() // k, w.reshape(-1)[order.long()], T)
    torch.testing.assert_close(y, ref.combine_rows(y_perm, order, pos, w))


def test_smoke_run_cpu(tmp_path, capsys):
    rc = rd.main(["--out", str(tmp_path), "--quick", "--device", "cpu", "--experts", "8",
                  "-T", "64", "--budget", "0.002", "--no-ceiling"])
    assert rc == 0
    res = json.loads((tmp_path / "router_dispatch.json").read_text())
    benches = {(r["bench"], r["impl"]) for r in res["rows"]}
    assert {("router", "torch"), ("dispatch", "torch_sort"), ("gather", "index_select"),
            ("combine", "index_add")} <= benches
    for r in res["rows"]:
        assert r["ok"] and r["median_s"] > 0 and r["gb_per_s"] > 0 and r["n"] >= 5
    out = capsys.readouterr().out
    assert out.strip().splitlines()[0].startswith("wrote ")
    assert "median us" in out and out.rstrip().splitlines()[-1].startswith("device:")
