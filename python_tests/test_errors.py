"""Bad inputs: every applicable class of the error table, for every op, through the wrapper AND
through torch.ops.molora directly. The exception class must be exact (ValueError / TypeError /
IndexError), the message must name the op and the argument, and ``base`` must be unmodified."""
import re

import pytest
import torch

import molora_ops
from molora_ops import reference as ref
from utils import ALL_OPS, distinct_ids, drop_ids, rank_offsets_from_ranks, torch_op, uniform_rank_offsets

T, E, K, D, DOUT = 6, 5, 2, 4, 3
RANKS = [2, 0, 3, 1, 2]  # ragged, one rank-0 expert; R = 8, max rank 3
R = sum(RANKS)
MAXR = max(RANKS)
RK, KR = 9, 3  # masked family: total rank, kept ranks
META = "meta"


def _ids():
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    ids[1, 1] = -1
    return ids


def _rids():
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(RK, generator=g)[:KR] for _ in range(T)]).to(torch.int32)
    ids[2, 0] = -1
    return ids


def _logits():
    return (torch.arange(T * E, dtype=torch.float32).reshape(T, E) * 0.37).sin() * 2


def valid(op):
    """(ordered dict of schema args, set of keyword-only names) of a valid call."""
    ids = _ids()
    order, pos, eo = ref.dispatch(ids, E, 2)
    P = order.numel()
    ro = rank_offsets_from_ranks(RANKS)
    w = torch.rand(T, K) + 0.25
    s = torch.rand(E) + 0.5
    lg = _logits()
    rids = _rids()
    if op == "softmax_topk":
        return dict(logits=lg, k=K, renormalize=True), set()
    if op == "topk_softmax":
        return dict(logits=lg, k=K, temperature=0.8), set()
    if op == "sigmoid_topk":
        return dict(logits=lg, k=K, bias=torch.rand(E) * 0.1, normalize=True, bias_in_weights=False, scale=1.0), set()
    if op == "softmax_topp":
        return dict(logits=lg, top_p=0.6, min_k=1, entropy_threshold=1.0, q=1.1, eps=1e-5), set()
    if op == "dispatch":
        return dict(ids=ids, num_experts=E, block_size=2), set()
    if op == "gather_rows":
        return dict(x=torch.randn(T, D), order=order, pos=pos, weights=w), set()
    if op == "combine_rows":
        return dict(y_perm=torch.randn(P, D), order=order, pos=pos, weights=w), set()
    if op == "sgmv_shrink":
        return dict(x=torch.randn(T, D), A=torch.randn(R, D), rank_offsets=ro, order=order, pos=pos,
                    expert_offsets=eo, weights=w, scales=s, max_rank=MAXR), {"max_rank"}
    if op == "sgmv_expand":
        return dict(h=torch.randn(P, MAXR), B=torch.randn(DOUT, R), rank_offsets=ro, order=order, pos=pos,
                    expert_offsets=eo, weights=w, scales=s, base=torch.randn(T, DOUT)), set()
    if op == "stacked_gated_lora":
        return dict(x=torch.randn(T, D), A=torch.randn(R, D), B=torch.randn(DOUT, R), gate=torch.randn(T, E),
                    rank_offsets=ro, scales=s, base=torch.randn(T, DOUT), shared_a=False), set()
    if op == "fused_moe_lora":
        return dict(x=torch.randn(T, D), A=torch.randn(R, D), B=torch.randn(DOUT, R), rank_offsets=ro,
                    weights=w, ids=ids, scales=s, base=torch.randn(T, DOUT)), set()
    if op == "rank_topk":
        return dict(h=torch.randn(T, RK), k=KR, scores=torch.randn(T, RK), bias=torch.rand(RK), use_abs=False), set()
    if op == "rank_sparse_shrink":
        return dict(x=torch.randn(T, D), A=torch.randn(RK, D), ids=rids), set()
    if op == "rank_sparse_expand":
        return dict(values=torch.randn(T, KR), ids=rids, B=torch.randn(DOUT, RK), weights=torch.rand(T, KR),
                    scale=1.0, base=torch.randn(T, DOUT)), set()
    if op == "id_histogram":
        return dict(ids=ids, num_bins=E), set()
    if op == "softmax_route_backward":
        wt, it = ref.softmax_topk(lg, K, True)
        return dict(grad_weights=torch.randn(T, K), weights=wt, ids=it, logits=lg, renormalized=True,
                    scale=1.0), set()
    if op == "sigmoid_topk_backward":
        b = torch.rand(E) * 0.1
        wt, it = ref.sigmoid_topk(lg, K, b, True, False, 1.0)
        return dict(grad_weights=torch.randn(T, K), weights=wt, ids=it, logits=lg, bias=b, normalize=True,
                    bias_in_weights=False, scale=1.0), set()
    if op == "pair_dot":
        return dict(a=torch.randn(T, D), b=torch.randn(P, D), pos=pos, a_by_token=True), set()
    if op == "sgmv_weight_grad":
        return dict(x=torch.randn(T, D), h=torch.randn(P, MAXR), rank_offsets=ro, order=order, pos=pos,
                    expert_offsets=eo, weights=w, scales=s, total_rank=R), set()
    if op == "sgmv_expand_backward":
        return dict(grad_y=torch.randn(T, DOUT), h=torch.randn(P, MAXR), B=torch.randn(DOUT, R), rank_offsets=ro,
                    order=order, pos=pos, expert_offsets=eo, weights=w, scales=s), set()
    if op == "stacked_gated_lora_backward":
        return dict(grad_y=torch.randn(T, DOUT), x=torch.randn(T, D), A=torch.randn(R, D), B=torch.randn(DOUT, R),
                    gate=torch.randn(T, E), rank_offsets=ro, scales=s, shared_a=False), set()
    if op == "rank_scatter":
        return dict(src=torch.randn(T, KR), ids=rids, num_ranks=RK), set()
    if op == "rank_sparse_weight_grad":
        return dict(x=torch.randn(T, D), g=torch.randn(T, KR), ids=rids, num_ranks=RK), set()
    raise KeyError(op)


# mutations: value transforms
def shape1d(t):
    return t.flatten()


def shape3d(t):
    return t.unsqueeze(0)


def as_int(t):
    return t.to(torch.int32)


def as_float(t):
    return t.to(torch.float32)


def as_f64(t):
    return t.to(torch.float64)


def to_meta(t):
    return t.to(META)


def extra_col(t):
    return torch.cat([t, t[..., -1:]], dim=-1)  # (1-D offsets stay non-decreasing)


def extra_row(t):
    return torch.cat([t, t[:1]], dim=0)


def drop_col(t):
    return t[..., :-1].contiguous()


def set_at(value, idx=(0, 0)):
    def f(t):
        t = t.clone()
        t[idx] = value
        return t
    return f


DECREASING_RO = torch.tensor([0, 2, 5, 3, 6, R], dtype=torch.int32)  # rank of expert 2 is -2; last still R

# (op, case id, exception, {arg: transform or value}, argument names one of which the message names)
CASES = []


def case(op, cid, exc, changes, args):
    CASES.append((op, cid, exc, changes, args))


for op in ("softmax_topk", "topk_softmax", "sigmoid_topk", "softmax_topp"):
    case(op, "logits-1d", ValueError, {"logits": shape1d}, ["logits"])
    case(op, "logits-3d", ValueError, {"logits": shape3d}, ["logits"])
    case(op, "logits-int", TypeError, {"logits": as_int}, ["logits"])
for op in ("softmax_topk", "topk_softmax", "sigmoid_topk"):
    case(op, "k0", ValueError, {"k": 0}, ["k"])
    case(op, "k>E", ValueError, {"k": E + 1}, ["k"])
case("topk_softmax", "temperature0", ValueError, {"temperature": 0.0}, ["temperature"])
case("topk_softmax", "temperature<0", ValueError, {"temperature": -1.0}, ["temperature"])
case("sigmoid_topk", "bias-shape", ValueError, {"bias": extra_col}, ["bias"])
case("sigmoid_topk", "bias-int", TypeError, {"bias": as_int}, ["bias"])
case("sigmoid_topk", "bias-device", ValueError, {"bias": to_meta}, ["bias", "logits", "device"])
case("softmax_topp", "top_p0", ValueError, {"top_p": 0.0}, ["top_p"])
case("softmax_topp", "top_p>1", ValueError, {"top_p": 1.5}, ["top_p"])
case("softmax_topp", "top_p<0", ValueError, {"top_p": -0.2}, ["top_p"])
case("softmax_topp", "min_k0", ValueError, {"min_k": 0}, ["min_k"])
case("softmax_topp", "min_k>E", ValueError, {"min_k": E + 1}, ["min_k"])

case("dispatch", "ids-float", TypeError, {"ids": as_float}, ["ids"])
case("dispatch", "ids-1d", ValueError, {"ids": shape1d}, ["ids"])
case("dispatch", "ids-3d", ValueError, {"ids": shape3d}, ["ids"])
case("dispatch", "ids>=E", IndexError, {"ids": set_at(E)}, ["ids"])
case("dispatch", "ids<-1", IndexError, {"ids": set_at(-2)}, ["ids"])
case("dispatch", "block_size0", ValueError, {"block_size": 0}, ["block_size"])
case("dispatch", "num_experts0", ValueError, {"num_experts": 0}, ["num_experts"])
case("dispatch", "rows>int32", ValueError, {"block_size": 2 ** 30}, ["block_size"])

for op, data in (("gather_rows", "x"), ("combine_rows", "y_perm")):
    case(op, f"{data}-1d", ValueError, {data: shape1d}, [data])
    case(op, f"{data}-int", TypeError, {data: as_int}, [data])
    case(op, "order-float", TypeError, {"order": as_float}, ["order"])
    case(op, "pos-float", TypeError, {"pos": as_float}, ["pos"])
    case(op, "weights-shape", ValueError, {"weights": extra_col}, ["weights"])
    case(op, "weights-int", TypeError, {"weights": as_int}, ["weights"])
    case(op, "pos-out-of-range", IndexError, {"pos": set_at(10 ** 4)}, ["pos"])
    case(op, "pos<-1", IndexError, {"pos": set_at(-3)}, ["pos"])
    case(op, "order-out-of-range", IndexError, {"order": set_at(T * K, (0,))}, ["order"])
    case(op, "order<-1", IndexError, {"order": set_at(-5, (0,))}, ["order"])
    case(op, "weights-device", ValueError, {"weights": to_meta}, ["weights", data, "device"])
    case(op, f"{data}-device", ValueError, {data: to_meta}, ["weights", data, "device", "order", "pos"])
case("gather_rows", "x-rows", ValueError, {"x": extra_row}, ["x", "pos"])
case("combine_rows", "y_perm-rows", ValueError, {"y_perm": extra_row}, ["y_perm", "order"])

for op in ("sgmv_shrink", "sgmv_expand", "sgmv_weight_grad"):
    case(op, "rank_offsets-float", TypeError, {"rank_offsets": as_float}, ["rank_offsets"])
    case(op, "rank_offsets-length", ValueError, {"rank_offsets": drop_col}, ["rank_offsets", "expert_offsets"])
    case(op, "rank_offsets-decreasing", ValueError, {"rank_offsets": DECREASING_RO}, ["rank_offsets"])
    case(op, "expert_offsets-length", ValueError, {"expert_offsets": extra_col}, ["expert_offsets", "rank_offsets"])
    case(op, "expert_offsets-out-of-range", IndexError, {"expert_offsets": set_at(10 ** 4, (E,))},
         ["expert_offsets"])
    case(op, "order-out-of-range", IndexError, {"order": set_at(T * K, (0,))}, ["order"])
    case(op, "pos-out-of-range", IndexError, {"pos": set_at(10 ** 4)}, ["pos"])
    case(op, "order-float", TypeError, {"order": as_float}, ["order"])
    case(op, "weights-shape", ValueError, {"weights": extra_col}, ["weights"])
    case(op, "weights-int", TypeError, {"weights": as_int}, ["weights"])
    case(op, "scales-shape", ValueError, {"scales": extra_col}, ["scales"])
    case(op, "weights-device", ValueError, {"weights": to_meta}, ["weights", "device"])
case("sgmv_shrink", "x-1d", ValueError, {"x": shape1d}, ["x"])
case("sgmv_shrink", "x-int", TypeError, {"x": as_int, "A": as_int}, ["x", "A"])
case("sgmv_shrink", "A-dtype", TypeError, {"A": as_f64}, ["A"])
case("sgmv_shrink", "A-d_in", ValueError, {"A": extra_col}, ["A", "x"])
case("sgmv_shrink", "max_rank-too-small", ValueError, {"max_rank": MAXR - 1}, ["max_rank"])
case("sgmv_shrink", "A-device", ValueError, {"A": to_meta}, ["A", "x", "device"])
case("sgmv_expand", "h-int", TypeError, {"h": as_int, "B": as_int}, ["h", "B"])
case("sgmv_expand", "B-dtype", TypeError, {"B": as_f64}, ["B"])
case("sgmv_expand", "B-cols", ValueError, {"B": extra_col}, ["B", "rank_offsets"])
case("sgmv_expand", "h-rows", ValueError, {"h": extra_row}, ["h", "order"])
case("sgmv_expand", "max_rank-too-small", ValueError, {"h": drop_col}, ["h", "max_rank"])
case("sgmv_expand", "base-shape", ValueError, {"base": extra_col}, ["base"])
case("sgmv_expand", "base-device", ValueError, {"base": to_meta}, ["base", "device"])
case("sgmv_expand", "B-device", ValueError, {"B": to_meta}, ["B", "h", "device"])
case("sgmv_weight_grad", "x-int", TypeError, {"x": as_int, "h": as_int}, ["x", "h"])
case("sgmv_weight_grad", "h-dtype", TypeError, {"h": as_f64}, ["h"])
case("sgmv_weight_grad", "h-rows", ValueError, {"h": extra_row}, ["h", "order"])
case("sgmv_weight_grad", "max_rank-too-small", ValueError, {"h": drop_col}, ["h", "max_rank"])
case("sgmv_weight_grad", "x-device", ValueError, {"x": to_meta}, ["x", "h", "device"])
case("sgmv_expand_backward", "grad_y-int", TypeError, {"grad_y": as_int, "h": as_int, "B": as_int},
     ["grad_y", "h", "B"])
case("sgmv_expand_backward", "h-dtype", TypeError, {"h": as_f64}, ["h"])
case("sgmv_expand_backward", "B-dtype", TypeError, {"B": as_f64}, ["B"])
case("sgmv_expand_backward", "h-rows", ValueError, {"h": extra_row}, ["h", "order"])
case("sgmv_expand_backward", "max_rank-too-small", ValueError, {"h": drop_col}, ["h", "max_rank"])
case("sgmv_expand_backward", "B-rows", ValueError, {"B": extra_row}, ["B", "grad_y"])
case("sgmv_expand_backward", "B-cols", ValueError, {"B": extra_col}, ["B", "rank_offsets"])
case("sgmv_expand_backward", "rank_offsets-decreasing", ValueError, {"rank_offsets": DECREASING_RO},
     ["rank_offsets"])
case("sgmv_expand_backward", "grad_y-device", ValueError, {"grad_y": to_meta}, ["grad_y", "h", "device"])

for op in ("stacked_gated_lora", "stacked_gated_lora_backward"):
    case(op, "gate-shape", ValueError, {"gate": extra_col}, ["gate", "rank_offsets", "scales"])
    case(op, "gate-int", TypeError, {"gate": as_int}, ["gate"])
    case(op, "A-dtype", TypeError, {"A": as_f64}, ["A"])
    case(op, "A-d_in", ValueError, {"A": extra_col}, ["A", "x"])
    case(op, "B-cols", ValueError, {"B": extra_col}, ["B", "rank_offsets"])
    case(op, "rank_offsets-decreasing", ValueError, {"rank_offsets": DECREASING_RO}, ["rank_offsets"])
    case(op, "rank_offsets-float", TypeError, {"rank_offsets": as_float}, ["rank_offsets"])
    case(op, "shared_a-ragged", ValueError, {"shared_a": True, "A": lambda a: a[:2].contiguous()},
         ["rank_offsets", "shared_a", "A"])
    case(op, "scales-shape", ValueError, {"scales": extra_col}, ["scales"])
    case(op, "gate-device", ValueError, {"gate": to_meta}, ["gate", "device"])
case("stacked_gated_lora", "x-int", TypeError, {"x": as_int, "A": as_int, "B": as_int}, ["x", "A", "B"])
case("stacked_gated_lora", "base-shape", ValueError, {"base": extra_col}, ["base"])
case("stacked_gated_lora", "base-device", ValueError, {"base": to_meta}, ["base", "device"])
case("stacked_gated_lora_backward", "grad_y-shape", ValueError, {"grad_y": extra_col}, ["grad_y"])
case("stacked_gated_lora_backward", "grad_y-device", ValueError, {"grad_y": to_meta}, ["grad_y", "device"])

case("fused_moe_lora", "x-1d", ValueError, {"x": shape1d}, ["x"])
case("fused_moe_lora", "x-int", TypeError, {"x": as_int, "A": as_int, "B": as_int}, ["x", "A", "B"])
case("fused_moe_lora", "A-dtype", TypeError, {"A": as_f64}, ["A"])
case("fused_moe_lora", "A-d_in", ValueError, {"A": extra_col}, ["A", "x"])
case("fused_moe_lora", "B-cols", ValueError, {"B": extra_col}, ["A", "B"])
case("fused_moe_lora", "ids-float", TypeError, {"ids": as_float}, ["ids"])
case("fused_moe_lora", "ids-rows", ValueError, {"ids": extra_row}, ["ids", "x"])
case("fused_moe_lora", "ids>=E", IndexError, {"ids": set_at(E)}, ["ids"])
case("fused_moe_lora", "ids<-1", IndexError, {"ids": set_at(-2)}, ["ids"])
case("fused_moe_lora", "weights-shape", ValueError, {"weights": extra_col}, ["weights"])
case("fused_moe_lora", "weights-int", TypeError, {"weights": as_int}, ["weights"])
case("fused_moe_lora", "rank_offsets-decreasing", ValueError, {"rank_offsets": DECREASING_RO}, ["rank_offsets"])
case("fused_moe_lora", "rank_offsets-float", TypeError, {"rank_offsets": as_float}, ["rank_offsets"])
case("fused_moe_lora", "scales-shape", ValueError, {"scales": extra_col}, ["scales"])
case("fused_moe_lora", "base-shape", ValueError, {"base": extra_col}, ["base"])
case("fused_moe_lora", "base-device", ValueError, {"base": to_meta}, ["base", "device"])
case("fused_moe_lora", "ids-device", ValueError, {"ids": to_meta}, ["ids", "device"])

case("rank_topk", "h-1d", ValueError, {"h": shape1d}, ["h"])
case("rank_topk", "h-int", TypeError, {"h": as_int}, ["h"])
case("rank_topk", "k0", ValueError, {"k": 0}, ["k"])
case("rank_topk", "k>R", ValueError, {"k": RK + 1}, ["k"])
case("rank_topk", "scores-shape", ValueError, {"scores": extra_col}, ["scores"])
case("rank_topk", "scores-int", TypeError, {"scores": as_int}, ["scores"])
case("rank_topk", "bias-shape", ValueError, {"bias": extra_col}, ["bias"])
case("rank_topk", "scores-device", ValueError, {"scores": to_meta}, ["scores", "device"])

case("rank_sparse_shrink", "ids>=R", IndexError, {"ids": set_at(RK)}, ["ids"])
case("rank_sparse_shrink", "ids<-1", IndexError, {"ids": set_at(-2)}, ["ids"])
case("rank_sparse_shrink", "ids-float", TypeError, {"ids": as_float}, ["ids"])
case("rank_sparse_shrink", "A-dtype", TypeError, {"A": as_f64}, ["A"])
case("rank_sparse_shrink", "A-d_in", ValueError, {"A": extra_col}, ["A", "x"])
case("rank_sparse_shrink", "ids-rows", ValueError, {"ids": extra_row}, ["ids", "x"])
case("rank_sparse_shrink", "A-device", ValueError, {"A": to_meta}, ["A", "device"])

case("rank_sparse_expand", "values-shape", ValueError, {"values": extra_col}, ["values", "ids"])
case("rank_sparse_expand", "values-int", TypeError, {"values": as_int}, ["values"])
case("rank_sparse_expand", "B-dtype", TypeError, {"B": as_f64}, ["B"])
case("rank_sparse_expand", "ids>=R", IndexError, {"ids": set_at(RK)}, ["ids"])
case("rank_sparse_expand", "ids-float", TypeError, {"ids": as_float}, ["ids"])
case("rank_sparse_expand", "weights-shape", ValueError, {"weights": extra_col}, ["weights"])
case("rank_sparse_expand", "base-shape", ValueError, {"base": extra_col}, ["base"])
case("rank_sparse_expand", "B-device", ValueError, {"B": to_meta}, ["B", "device"])

case("id_histogram", "ids-float", TypeError, {"ids": as_float}, ["ids"])
case("id_histogram", "ids>=num_bins", IndexError, {"ids": set_at(E)}, ["ids"])
case("id_histogram", "ids<-1", IndexError, {"ids": set_at(-2)}, ["ids"])

for op in ("softmax_route_backward", "sigmoid_topk_backward"):
    case(op, "grad_weights-shape", ValueError, {"grad_weights": extra_col}, ["grad_weights"])
    case(op, "weights-shape", ValueError, {"weights": extra_col}, ["weights"])
    case(op, "ids-float", TypeError, {"ids": as_float}, ["ids"])
    case(op, "ids>=E", IndexError, {"ids": set_at(E)}, ["ids"])
    case(op, "logits-rows", ValueError, {"logits": extra_row}, ["logits", "ids", "weights", "grad_weights"])
    case(op, "logits-int", TypeError, {"logits": as_int}, ["logits"])
    case(op, "grad_weights-int", TypeError, {"grad_weights": as_int}, ["grad_weights"])
    case(op, "logits-device", ValueError, {"logits": to_meta}, ["logits", "device"])
case("sigmoid_topk_backward", "bias-shape", ValueError, {"bias": extra_col}, ["bias"])

case("pair_dot", "b-cols", ValueError, {"b": extra_col}, ["a", "b"])
case("pair_dot", "a-rows", ValueError, {"a": extra_row}, ["a"])
case("pair_dot", "a-rows-by-row", ValueError, {"a_by_token": False}, ["a"])
case("pair_dot", "pos-out-of-range", IndexError, {"pos": set_at(10 ** 4)}, ["pos"])
case("pair_dot", "pos-float", TypeError, {"pos": as_float}, ["pos"])
case("pair_dot", "a-int", TypeError, {"a": as_int, "b": as_int}, ["a", "b"])
case("pair_dot", "b-device", ValueError, {"b": to_meta}, ["b", "device"])

case("rank_scatter", "ids>=R", IndexError, {"ids": set_at(RK)}, ["ids"])
case("rank_scatter", "ids<-1", IndexError, {"ids": set_at(-2)}, ["ids"])
case("rank_scatter", "src-shape", ValueError, {"src": extra_col}, ["src", "ids"])
case("rank_scatter", "ids-float", TypeError, {"ids": as_float}, ["ids"])
case("rank_scatter", "src-int", TypeError, {"src": as_int}, ["src"])
case("rank_scatter", "ids-device", ValueError, {"ids": to_meta}, ["ids", "device"])

case("rank_sparse_weight_grad", "ids>=R", IndexError, {"ids": set_at(RK)}, ["ids"])
case("rank_sparse_weight_grad", "g-shape", ValueError, {"g": extra_col}, ["g", "ids"])
case("rank_sparse_weight_grad", "x-rows", ValueError, {"x": extra_row}, ["x", "g", "ids"])
case("rank_sparse_weight_grad", "ids-float", TypeError, {"ids": as_float}, ["ids"])
case("rank_sparse_weight_grad", "g-device", ValueError, {"g": to_meta}, ["g", "device"])


def message_re(op, args):
    op_re = re.escape(op) + r"(?!\w)"
    arg_re = "|".join(r"(?<!\w)" + re.escape(a) + r"(?!\w)" for a in args)
    return rf"(?s)(?=.*{op_re})(?=.*(?:{arg_re}))"


def build(op, changes):
    args, kwonly = valid(op)
    for name, ch in changes.items():
        assert name in args, (op, name)
        args[name] = ch(args[name]) if callable(ch) else ch
    pos_args = [v for n, v in args.items() if n not in kwonly]
    kw = {n: args[n] for n in kwonly}
    return args, pos_args, kw


def test_every_op_has_error_cases():
    ops = {c[0] for c in CASES}
    assert ops == set(ALL_OPS), set(ALL_OPS) - ops


@pytest.mark.parametrize("op", ALL_OPS)
def test_valid_call_succeeds(op):
    # the base call of every error case is valid, so each error below is caused by its one change
    args, pos_args, kw = build(op, {})
    getattr(molora_ops, op)(*pos_args, **kw)
    getattr(ref, op)(*pos_args, **kw)


@pytest.mark.parametrize("via", ["wrapper", "torch.ops"])
@pytest.mark.parametrize("op,cid,exc,changes,argnames", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input(op, cid, exc, changes, argnames, via):
    fn = getattr(molora_ops, op) if via == "wrapper" else torch_op(op)
    args, pos_args, kw = build(op, changes)
    if cid.endswith("-device"):
        # "tensors on different devices": the message may name either tensor of the pair
        argnames = list(argnames) + [n for n, v in args.items() if isinstance(v, torch.Tensor)] + ["device"]
    snapshots = {n: v.clone() for n, v in args.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises(exc, match=message_re(op, argnames)):
        fn(*pos_args, **kw)
    for n, v in snapshots.items():
        assert torch.equal(args[n], v), f"{op}: argument {n} was modified by a failing call"


@pytest.mark.parametrize("via", ["wrapper", "torch.ops"])
@pytest.mark.parametrize("op", ["sgmv_expand", "stacked_gated_lora", "fused_moe_lora",
                                "rank_sparse_expand"])
def test_base_untouched_on_late_error(op, via):
    """Errors that need to read index values (the last thing a kernel could check) must still fire
    before anything is written into base."""
    fn = getattr(molora_ops, op) if via == "wrapper" else torch_op(op)
    changes = {
        "sgmv_expand": {"pos": set_at(10 ** 4, (T - 1, K - 1))},
        "stacked_gated_lora": {"rank_offsets": DECREASING_RO},
        "fused_moe_lora": {"ids": set_at(E, (T - 1, K - 1))},
        "rank_sparse_expand": {"ids": set_at(RK, (T - 1, KR - 1))},
    }[op]
    args, pos_args, kw = build(op, changes)
    base = args["base"]
    before = base.clone()
    with pytest.raises((IndexError, ValueError)):
        fn(*pos_args, **kw)
    assert torch.equal(base, before)


@pytest.mark.parametrize("via", ["wrapper", "torch.ops"])
@pytest.mark.parametrize("bad,exc", [([1, 3, 8], IndexError), ([0, 3, 7], ValueError),
                                     ([0, 5, 3], ValueError)])
def test_rank_offsets_values(bad, exc, via):
    """rank_offsets must start at 0 (IndexError), not decrease (ValueError) and end at the bank's R
    (ValueError), the same on the native path and in the reference."""
    ids = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)
    order, pos, eo = molora_ops.dispatch(ids, 2)
    x, A = torch.randn(2, 4), torch.randn(8, 4)
    ro = torch.tensor(bad, dtype=torch.int32)
    fn = molora_ops.sgmv_shrink if via == "wrapper" else None
    with pytest.raises(exc, match="molora.sgmv_shrink: rank_offsets"):
        if fn is not None:
            fn(x, A, ro, order, pos, eo, max_rank=8)
        else:
            torch_op("sgmv_shrink")(x, A, ro, order, pos, eo, None, None, 8)
    with pytest.raises(exc, match="molora.sgmv_shrink: rank_offsets"):
        ref.sgmv_shrink(x, A, ro, order, pos, eo, max_rank=8)
