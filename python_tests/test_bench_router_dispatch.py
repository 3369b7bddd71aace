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


def test_byte_models_are_the_bench_models():
    """The script's bytes are bench/models.py's forward costs (one byte model), with the
    conventions stated there: the gather reads P rows of x through order."""
    from bench import models
    T, E, k, d = 16384, 64, 8, 4096
    P = T * k
    assert rd.router_bytes(T, E, k) == T * E * 2 + T * k * 8
    assert rd.router_bytes(T, E, k, logit_bytes=4) == T * E * 4 + T * k * 8
    assert rd.router_bytes(T, E, k) == models.cost(
        "softmax_topk", models.Dims(T, 0, 0, E, k, 0, elem=2), "fwd").bytes
    assert rd.dispatch_bytes(T, k, E) == P * 4 + 2 * P * 4 + (E + 1) * 4
    assert rd.gather_bytes(T, k, d) == P * d * 2 + P * 4 + P * d * 2
    assert rd.gather_bytes(T, k, d, weighted=True) == rd.gather_bytes(T, k, d) + P * 4
    assert rd.combine_bytes(T, k, d) == P * d * 2 + 2 * P * 4 + T * d * 2
    assert rd.combine_bytes(T, k, d, weighted=False) == P * d * 2 + P * 4 + T * d * 2
    # gather/combine at d = 4096 are dominated by the rows: ~ 2k * T * d * 2 and (k + 1) * T * d * 2
    assert abs(rd.gather_bytes(T, k, d) / (2 * k * T * d * 2) - 1) < 1e-3
    assert abs(rd.combine_bytes(T, k, d) / ((k + 1) * T * d * 2) - 1) < 1e-3
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


def test_tie_aware_router_check():
    # bf16 logits on a coarse grid: most rows have ties inside / at the edge of their top k, where
    # torch.topk's order is unspecified; the stable reference sends ties to the lower id
    g = torch.Generator().manual_seed(0)
    logits = (torch.randint(-3, 4, (200, 16), generator=g).float() / 2).to(torch.bfloat16)
    k = 4
    w_ref, ids_ref = ref.softmax_topk(logits, k, True)
    ok, note, tie_rows = rd.check_router(w_ref, ids_ref, logits, k)
    assert ok and note == "" and tie_rows >= 0
    # a permutation of tied ids matches torch.topk tie-aware, but not the stable reference
    _, ids_torch = rd.torch_router(logits, k)
    assert not rd.tie_mismatch(ids_torch, ids_ref, logits).any()
    swapped = ids_ref.clone()
    row = int(((logits.float().gather(1, ids_ref.long())[:, 0] ==
                logits.float().gather(1, ids_ref.long())[:, 1])).nonzero()[0])
    swapped[row, [0, 1]] = swapped[row, [1, 0]]
    assert not rd.tie_mismatch(swapped, ids_ref, logits).any()
    ok, note, _ = rd.check_router(w_ref, swapped, logits, k)
    assert not ok and note.startswith("1 rows differ from the stable reference, 0 from torch.topk")
    # a wrong id (a smaller logit) differs beyond ties
    wrong = ids_ref.clone()
    wrong[row, k - 1] = int(logits[row].float().argmin())
    if logits[row, wrong[row, k - 1]] != logits[row, ids_ref[row, k - 1]]:
        assert rd.tie_mismatch(wrong, ids_ref, logits)[row]
    dup = ids_ref.clone()
    dup[row, 1] = dup[row, 0]
    assert rd.tie_mismatch(dup, ids_ref, logits)[row]


def test_emulated_smoke_run_summary_and_plot(tmp_path, capsys, monkeypatch):
    import importlib.util
    if importlib.util.find_spec("molora_ops._C_emu") is None and not os.environ.get("MOLORA_EMU_LIB"):
        if os.environ.get("MOLORA_REQUIRE_EMU", "0") not in ("", "0"):
            pytest.fail("molora_ops._C_emu is not built (MOLORA_REQUIRE_EMU=1: CI's developer build)")
        pytest.skip("the CUDA emulation module is not built (a user build; MOLORA_DEV_BUILD=1 builds it)")
    monkeypatch.setenv("MOLORA_POISON_OUTPUTS", "1")  # recorded and warned about
    rc = rd.main(["--out", str(tmp_path), "--quick", "--emulate", "--experts", "8", "--topk", "2",
                  "-T", "16", "--budget", "0.002", "--no-ceiling", "--plot"])
    assert rc == 0
    res = json.loads((tmp_path / "router_dispatch.json").read_text())
    assert res["meta"]["poison_outputs"] is True and "emulation" in res["meta"]["molora_impl"]
    ours = [r for r in res["rows"] if r["impl"] == "molora"]
    assert {r["bench"] for r in ours} == set(rd.BENCHES) and all(r["ok"] for r in ours)
    assert [r["tie_rows"] for r in ours if r["bench"] == "router"][0] is not None
    out, err = capsys.readouterr()
    assert "MOLORA_POISON_OUTPUTS is on" in err
    summary = [ln for ln in out.splitlines() if ln.startswith("summary: ")]
    assert len(summary) == 1 and "8 rows (4 molora), 0 failures" in summary[0]
    assert "WARNING: outputs poisoned" in summary[0]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "router_dispatch.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        rd.parse_args(["--out", "x", "--emulate", "--device", "cuda"])
