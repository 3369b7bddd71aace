"""molora_ops.functional.moe_lora_linear: every formulation (grouped, dense, fused, auto) against
the float64 reference and against each other, forward and backward (dx, dA, dB, d routing weights,
d base / d weight / d bias), on the ragged cases; gradcheck; fullgraph compile; errors; the GPU
path's sync-freedom; and the plan's (molora_ops.plan) targets at the H200 shape."""
import pytest
import torch

import molora_ops
from molora_ops import functional as MF
from molora_ops import plan
from molora_ops import reference as ref

ALGOS = ("grouped", "dense", "fused")

# (id, T, d_in, d_out, ranks, k, ids kind)
CASES = [
    ("ragged-drop", 9, 12, 10, (3, 0, 5, 2), 2, "drop"),
    ("T0", 0, 8, 6, (2, 3), 2, "drop"),
    ("T1", 1, 8, 6, (4, 4, 4), 2, "drop"),
    ("one-expert", 7, 8, 5, (3, 2, 6), 3, "one"),
    ("E7-k1-r5", 11, 16, 9, (5,) * 7, 1, "drop"),
    ("all-dropped", 4, 8, 6, (2, 2), 2, "none"),
    ("repeated-id", 6, 8, 6, (3, 2, 1), 2, "repeat"),
]


def _ids(kind, T, E, k, g):
    if kind == "one":
        ids = torch.full((T, k), E // 2, dtype=torch.int64)
        ids[:, 1:] = -1
        return ids
    if kind == "none":
        return torch.full((T, k), -1, dtype=torch.int64)
    ids = torch.randint(-1, E, (T, k), generator=g)
    if kind == "repeat" and T:
        ids[:, 1] = ids[:, 0].clamp(min=0)  # the same expert in two slots: both count
    return ids


def _problem(case, dtype=torch.float64, seed=0, lead=None):
    _, T, d_in, d_out, ranks, k, kind = case
    g = torch.Generator().manual_seed(seed)
    E, R = len(ranks), sum(ranks)
    ro = torch.tensor((0,) + tuple(ranks)).cumsum(0).to(torch.int32)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    p = dict(x=rnd(T, d_in), A=rnd(R, d_in, scale=0.5), B=rnd(d_out, R, scale=0.5),
             w=torch.rand(T, k, generator=g, dtype=torch.float64).to(dtype),
             W=rnd(d_out, d_in, scale=0.3), b=rnd(d_out), base=rnd(T, d_out),
             s=(torch.rand(E, generator=g, dtype=torch.float64) + 0.5).to(dtype),
             ids=_ids(kind, T, E, k, g), ro=ro, max_rank=max(ranks))
    if lead is not None:
        for n in ("x", "w", "ids", "base"):
            p[n] = p[n].reshape(*lead, p[n].shape[-1])
    return p


def _run(p, algo, leaves=("x", "A", "B", "w", "W", "b"), use_base=False, **kw):
    """y and the grads of ``leaves`` under a fixed random cotangent."""
    ts = {n: p[n].detach().clone().requires_grad_(n in leaves) for n in ("x", "A", "B", "w", "W",
                                                                         "b", "base")}
    frozen = dict(base=ts["base"]) if use_base else dict(weight=ts["W"], bias=ts["b"])
    y = MF.moe_lora_linear(ts["x"], ts["A"], ts["B"], p["ro"], ts["w"], p["ids"], p["s"],
                           algo=algo, max_rank=p["max_rank"], **frozen, **kw)
    g = torch.Generator().manual_seed(7)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    names = [n for n in leaves if ts[n].requires_grad]
    if use_base:
        names = [n for n in names if n not in ("W", "b")] + ["base"]
        ts["base"].requires_grad_(True)
        y = MF.moe_lora_linear(ts["x"], ts["A"], ts["B"], p["ro"], ts["w"], p["ids"], p["s"],
                               algo=algo, max_rank=p["max_rank"], base=ts["base"], **kw)
    if y.numel() == 0 or not names:
        return y.detach(), {}
    grads = torch.autograd.grad(y, [ts[n] for n in names], gy, allow_unused=True)
    return y.detach(), dict(zip(names, grads))


def _oracle(p, use_base=False):
    """The definition, in float64 through the per-expert loop of the reference ops."""
    x, ids = p["x"].double(), p["ids"]
    T = ids.reshape(-1, ids.shape[-1]).shape[0]
    k, d_out = ids.shape[-1], p["B"].shape[0]
    x2, ids2 = x.reshape(T, x.shape[-1]), ids.reshape(T, k)
    w2 = p["w"].double().reshape(T, k)
    base = p["base"].double().reshape(T, d_out) if use_base else \
        x2 @ p["W"].double().t() + p["b"].double()
    gate = ref.pair_gate(w2, ids2, p["ro"].numel() - 1, torch.float64)
    y = ref.stacked_gated_lora(x2, p["A"].double(), p["B"].double(), gate, p["ro"],
                               p["s"].double(), base)
    return y.reshape(*ids.shape[:-1], d_out)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("algo", ALGOS + ("auto",))
def test_algos_equal_reference_fp64(case, algo):
    """Forward equals the definition; every gradient equals the grouped path's (itself checked by
    gradcheck below and in test_gradcheck.py) to fp64 rounding."""
    p = _problem(case)
    y, grads = _run(p, algo)
    torch.testing.assert_close(y, _oracle(p), rtol=1e-10, atol=1e-10)
    y0, grads0 = _run(p, "grouped")
    assert grads.keys() == grads0.keys()
    for n in grads0:
        if grads0[n] is None:
            assert grads[n] is None or not grads[n].any(), n
            continue
        torch.testing.assert_close(grads[n], grads0[n], rtol=1e-10, atol=1e-10, msg=n)


@pytest.mark.parametrize("algo", ALGOS)
def test_base_tensor_and_leading_dims(algo):
    """base given as a tensor (its gradient is grad y), x with leading dims [B, S, d], and
    non-contiguous inputs."""
    case = ("lead", 12, 8, 6, (3, 4, 2), 2, "drop")
    p = _problem(case, lead=(3, 4))
    p["x"] = p["x"].transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    p["A"] = p["A"].t().contiguous().t()
    assert not p["x"].is_contiguous() and not p["A"].is_contiguous()
    y, grads = _run(p, algo, use_base=True)
    assert y.shape == (3, 4, 6)
    torch.testing.assert_close(y, _oracle(p, use_base=True), rtol=1e-10, atol=1e-10)
    y0, grads0 = _run(p, "grouped", use_base=True)
    for n in grads0:
        torch.testing.assert_close(grads[n], grads0[n], rtol=1e-10, atol=1e-10, msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("algo", ALGOS)
def test_low_precision_error_rule(algo, dtype):
    """The flash-attention rule: the error against the fp64 definition is at most ~2x that of the
    same-precision PyTorch composite (the reference run in ``dtype``), plus a small floor."""
    case = ("lp", 40, 64, 48, (16, 8, 16, 12, 16), 2, "drop")
    p64 = _problem(case, seed=3)
    p = {n: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
         for n, v in p64.items()}
    want = _oracle(p)  # fp64 of the rounded inputs
    y, _ = _run(p, algo, leaves=())
    gate = ref.pair_gate(p["w"], p["ids"], len(p["s"]), dtype)
    base = (p["x"] @ p["W"].t() + p["b"])
    composite = ref.stacked_gated_lora(p["x"], p["A"], p["B"], gate, p["ro"], p["s"], base)
    err = (y.double() - want).abs().max().item()
    err_ref = (composite.double() - want).abs().max().item()
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    assert err <= 2 * err_ref + floor * want.abs().max().item(), (err, err_ref)


@pytest.mark.parametrize("algo", ALGOS)
def test_gradcheck(algo):
    case = ("gc", 5, 4, 3, (2, 0, 3), 2, "drop")
    p = _problem(case, seed=5)

    def f(x, A, B, w, W, b):
        return MF.moe_lora_linear(x, A, B, p["ro"], w, p["ids"], p["s"], weight=W, bias=b,
                                  algo=algo, max_rank=3)

    args = [p[n].clone().requires_grad_() for n in ("x", "A", "B", "w", "W", "b")]
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("algo", ALGOS + ("auto",))
def test_compile_fullgraph(algo):
    case = ("cc", 10, 8, 6, (3, 2, 4), 2, "drop")
    p = _problem(case, dtype=torch.float32, seed=2)

    def f(x, A, B, w, base):
        return MF.moe_lora_linear(x, A, B, p["ro"], w, p["ids"], p["s"], base=base, algo=algo,
                                  max_rank=p["max_rank"])

    args = [p[n].clone().requires_grad_() for n in ("x", "A", "B", "w", "base")]
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(*args)
    y_eager = f(*args)
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(y.sum(), args)
    g_eager = torch.autograd.grad(y_eager.sum(), args)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_x_per_slot_equals_rows():
    """x_per_slot (the MoE-FFN's down projection: slot j of token t reads its own row) equals the
    grouped path on the rows laid out per pair."""
    case = ("slots", 6, 8, 5, (2, 3, 4), 2, "drop")
    p = _problem(case)
    xs = torch.randn(6, 2, 8, dtype=torch.float64)
    y = MF.moe_lora_linear(xs, p["A"], p["B"], p["ro"], p["w"], p["ids"], p["s"], x_per_slot=True)
    want = torch.zeros(6, 5, dtype=torch.float64)
    for j in range(2):  # slot j alone: a k=1 routing over the slot's own inputs
        gate = ref.pair_gate(p["w"][:, j:j + 1], p["ids"][:, j:j + 1], 3, torch.float64)
        want += ref.stacked_gated_lora(xs[:, j], p["A"], p["B"], gate, p["ro"], p["s"])
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="x_per_slot"):
        MF.moe_lora_linear(xs, p["A"], p["B"], p["ro"], p["w"], p["ids"], algo="dense",
                           x_per_slot=True)


def _grouped_op_by_op(x, A, B, ro, w, ids, s, base, W, b, max_rank, x_per_slot):
    """The grouped formulation through the public ops, each its own autograd node."""
    E, k = ro.numel() - 1, ids.shape[-1]
    T = ids.reshape(-1, k).shape[0]
    order, pos, eo = molora_ops.dispatch(ids.reshape(T, k), E, 1)
    x2 = x.reshape(-1, x.shape[-1])
    h = molora_ops.sgmv_shrink(x2, A, ro, order, pos.reshape(-1, 1) if x_per_slot else pos, eo,
                               max_rank=max_rank)
    w2 = None if w is None else w.reshape(T, k)
    base2 = None if base is None else base.reshape(T, -1)
    y = molora_ops.sgmv_expand(h, B, ro, order, pos, eo, w2, s, base2)
    if W is not None:
        y = y + x2 @ W.t() + b
    return y


@pytest.mark.parametrize("variant", ["weight", "base", "no_w_no_s", "x_per_slot", "w_no_grad"])
def test_grouped_training_node_equals_op_by_op(variant):
    """On the CPU a grouped call under autograd is one node (functional._GroupedNode: the frozen
    GEMM folded in, its d x accumulated into the adapter's; the routing weights applied by the
    A-side kernels). Its output and every gradient equal the graph of the public ops, each with
    its own autograd formula: frozen weight and bias, a base tensor, no routing weights and no
    scales, x_per_slot rows, routing weights that take no gradient; gradcheck on top."""
    case = ("node", 9, 8, 6, (3, 0, 5, 2), 2, "drop")
    p = _problem(case, seed=11)
    xs = torch.randn(9, 2, 8, dtype=torch.float64) if variant == "x_per_slot" else p["x"]
    use_w = variant != "no_w_no_s"
    kw = dict(x=xs, A=p["A"], B=p["B"], w=p["w"] if use_w else None,
              base=p["base"] if variant in ("base", "x_per_slot") else None,
              W=p["W"] if variant in ("weight", "no_w_no_s") else None,
              b=p["b"] if variant in ("weight", "no_w_no_s") else None)
    names = [n for n, v in kw.items() if v is not None]
    s = p["s"] if use_w else None

    def node(x, A, B, w, base, W, b):
        return MF.moe_lora_linear(x, A, B, p["ro"], w, p["ids"], s, base=base, weight=W, bias=b,
                                  algo="grouped", max_rank=5, x_per_slot=variant == "x_per_slot")

    def op_by_op(x, A, B, w, base, W, b):
        return _grouped_op_by_op(x, A, B, p["ro"], w, p["ids"], s, base, W, b, 5,
                                 variant == "x_per_slot")

    ts = {n: v.clone().requires_grad_() for n, v in kw.items() if v is not None}
    if variant == "w_no_grad":
        names.remove("w")
        ts["w"] = ts["w"].detach()
    args = [ts.get(n) for n in kw]
    y = node(*args)
    fn = y.grad_fn  # under the output's reshape
    while type(fn).__name__ in ("ViewBackward0", "UnsafeViewBackward0"):
        fn = fn.next_functions[0][0]
    assert type(fn).__name__ == "_GroupedNodeBackward", fn
    y0 = op_by_op(*args)
    torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(y, [ts[n] for n in names], gy)
    grads0 = torch.autograd.grad(y0, [ts[n] for n in names], gy)
    for n, a, b in zip(names, grads, grads0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=n)
    # dB in B's own layout (node and op formula alike): .backward() then keeps it as B.grad
    # where a transposed view would be copied into that layout first.
    i = names.index("B")
    assert grads[i].stride() == grads0[i].stride() == ts["B"].stride()

    def positional(*leaves):
        return node(*[dict(zip(names, leaves)).get(n, ts.get(n)) for n in kw])

    assert torch.autograd.gradcheck(positional, [ts[n] for n in names])
    # First-order only, as every op's formula: a second differentiation raises.
    recorded = torch.autograd.grad(node(*args), [ts[n] for n in names], gy, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        sum(g.sum() for g in recorded).backward()


# --- routed_moe_lora_linear: the entry behind its own softmax-top-k router ---------------------

# (id, lead dims, d_in, d_out, ranks, k, renormalize, frozen: "weight" / "base" / "bias" / None,
#  router bias)
ROUTED_CASES = [
    ("ragged", (9,), 12, 10, (3, 0, 5, 2), 2, True, "weight", True),
    ("T0", (0,), 8, 6, (2, 3), 2, True, "weight", True),
    ("T1", (1,), 8, 6, (4, 4, 4), 2, False, "base", False),
    ("E7-k1-r5", (11,), 16, 9, (5,) * 7, 1, True, None, True),
    ("k=E", (6,), 8, 5, (3, 2, 6), 3, False, "bias", False),
    ("lead-dims", (3, 4), 8, 6, (3, 4, 2), 2, True, "weight", True),
]


def _routed_problem(case, dtype=torch.float64, seed=0):
    _, lead, d_in, d_out, ranks, k, renorm, frozen, has_rb = case
    g = torch.Generator().manual_seed(seed)
    E, R = len(ranks), sum(ranks)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = rnd(*lead, d_in)
    x = x.transpose(0, -1).contiguous().transpose(0, -1)  # non-contiguous, same values
    p = dict(x=x, Wr=rnd(E, d_in), br=rnd(E) if has_rb else None, A=rnd(R, d_in, scale=0.5),
             B=rnd(d_out, R, scale=0.5), s=(torch.rand(E, generator=g, dtype=torch.float64)
                                           + 0.5).to(dtype),
             W=rnd(d_out, d_in, scale=0.3) if frozen == "weight" else None,
             b=rnd(d_out) if frozen in ("weight", "bias") else None,
             base=rnd(*lead, d_out) if frozen == "base" else None,
             ro=torch.tensor((0,) + tuple(ranks)).cumsum(0).to(torch.int32), k=k, renorm=renorm,
             max_rank=max(ranks))
    return p


_ROUTED_LEAVES = ("x", "Wr", "br", "A", "B", "W", "b", "base")


def _routed_run(fn, p, **kw):
    """fn's four outputs and the gradients of every given input under a loss that reads y, the
    router's logits and the routing weights (an auxiliary loss's inputs)."""
    ts = {n: None if p[n] is None else p[n].detach().clone().requires_grad_()
          for n in _ROUTED_LEAVES}
    out = fn(ts["x"], ts["Wr"], ts["A"], ts["B"], p["ro"], p["k"], p["s"], router_bias=ts["br"],
             renormalize=p["renorm"], base=ts["base"], weight=ts["W"], bias=ts["b"],
             max_rank=p["max_rank"], **kw)
    y, logits, w, ids = out
    g = torch.Generator().manual_seed(7)
    cot = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
           for t in (y, logits, w)]
    loss = (y * cot[0]).sum() + (logits * cot[1]).sum() + (w * cot[2]).sum()
    names = [n for n in _ROUTED_LEAVES if ts[n] is not None]
    grads = {}
    if loss.requires_grad and y.numel():
        grads = dict(zip(names, torch.autograd.grad(loss, [ts[n] for n in names])))
    return out, grads, y.grad_fn


@pytest.mark.parametrize("case", ROUTED_CASES, ids=[c[0] for c in ROUTED_CASES])
@pytest.mark.parametrize("algo", ("auto", "grouped", "dense"))
def test_routed_equals_router_then_entry(case, algo):
    """routed_moe_lora_linear equals its definition (the reference router, softmax_topk, then
    moe_lora_linear's oracle), forward (ids exactly) and every gradient, through y, the logits
    and the weights; on the CPU the grouped formulation is one autograd node (op
    routed_moe_lora's C++ autograd kernel), the others the ops' graph."""
    p = _routed_problem(case)
    out, grads, fn = _routed_run(MF.routed_moe_lora_linear, p, algo=algo)
    out0, grads0, _ = _routed_run(ref.routed_moe_lora_linear, p)
    assert isinstance(out, MF.RoutedOutput)
    for name, a, b in zip(out._fields, out, out0):
        assert a.shape == b.shape, name
        if name == "expert_ids":
            assert a.dtype == torch.int32 and torch.equal(a.long(), b.long())
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    assert grads.keys() == grads0.keys()
    for n in grads0:
        torch.testing.assert_close(grads[n], grads0[n], rtol=1e-10, atol=1e-10, msg=n)
    if algo == "grouped" and out.y.numel() and molora_ops.has_extension():
        while fn.name() in ("ViewBackward0", "UnsafeViewBackward0"):
            fn = fn.next_functions[0][0]
        assert fn.name().endswith("RoutedMoeLora>"), fn.name()  # the op's C++ autograd node


@pytest.mark.parametrize("leaves", [("A", "B"), ("x",), ("Wr", "br"), ("B", "W", "b"),
                                    ("base",)])
def test_routed_some_leaves(leaves):
    """Only some inputs take a gradient (frozen x, frozen router, adapter only, ...): those
    gradients equal the definition's, and the others are not computed."""
    frozen = "base" if leaves == ("base",) else "weight"
    p = _routed_problem(("some", (9,), 12, 10, (3, 0, 5, 2), 2, True, frozen, True), seed=4)
    ts = {n: None if p[n] is None else p[n].detach().clone().requires_grad_(n in leaves)
          for n in _ROUTED_LEAVES}
    grads = []
    for fn in (MF.routed_moe_lora_linear, ref.routed_moe_lora_linear):
        y, logits, w, _ = fn(ts["x"], ts["Wr"], ts["A"], ts["B"], p["ro"], 2, p["s"],
                             router_bias=ts["br"], base=ts["base"], weight=ts["W"], bias=ts["b"],
                             max_rank=5)
        loss = y.square().sum() + logits.sin().sum() + (w * 1.5).sum()
        grads.append(torch.autograd.grad(loss, [ts[n] for n in leaves]))
    for n, a, b in zip(leaves, *grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=n)


def test_routed_double_backward_raises():
    """First-order only, as every op's formula: differentiating the gradients again raises."""
    p = _routed_problem(ROUTED_CASES[0], seed=6)
    x, A = p["x"].clone().requires_grad_(), p["A"].clone().requires_grad_()
    out = MF.routed_moe_lora_linear(x, p["Wr"], A, p["B"], p["ro"], 2, p["s"], weight=p["W"],
                                    algo="grouped")
    gx, gA = torch.autograd.grad(out.y.square().sum(), [x, A], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (gx.sum() + gA.sum()).backward()


def test_routed_gradcheck():
    case = ("gc", (5,), 4, 3, (2, 0, 3), 2, True, "weight", True)
    p = _routed_problem(case, seed=5)

    def f(x, Wr, br, A, B, W, b):
        out = MF.routed_moe_lora_linear(x, Wr, A, B, p["ro"], 2, p["s"], router_bias=br,
                                        weight=W, bias=b, max_rank=3, algo="grouped")
        return out.y, out.router_logits, out.routing_weights

    args = [p[n].clone().requires_grad_() for n in ("x", "Wr", "br", "A", "B", "W", "b")]
    assert torch.autograd.gradcheck(f, args)


def test_routed_float32_error_rule():
    """fp32 on the CPU's C++ path: y's error against the float64 definition at most twice the
    error of the same definition run in fp32 (plus rounding), on the same routing."""
    case = ("f32", (64,), 48, 40, (8, 5, 16, 3, 11), 2, True, "weight", True)
    p64 = _routed_problem(case, seed=3)
    p32 = {n: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
           for n, v in p64.items()}
    y = _routed_run(MF.routed_moe_lora_linear, p32, algo="grouped")[0].y.double()
    y64 = _routed_run(ref.routed_moe_lora_linear, p64)[0][0]
    y32 = _routed_run(ref.routed_moe_lora_linear, p32)[0][0].double()
    assert (y - y64).abs().max() <= 2 * (y32 - y64).abs().max() + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_routed_low_precision_equals_composite(dtype):
    """In bf16 / fp16 / fp32 the CPU op (one node) equals the three calls it replaces (gate,
    softmax_topk, moe_lora_linear's grouped node) run in the same dtype: the same kernels, so
    the same routing and the outputs and gradients to the dtype's rounding (x's three
    gradients summed in another order)."""
    p = _routed_problem(("lp", (33,), 24, 20, (4, 6, 0, 5), 2, True, "weight", True), dtype, 9)
    out, grads, _ = _routed_run(MF.routed_moe_lora_linear, p, algo="grouped")

    def composite(x, Wr, A, B, ro, k, s, *, router_bias, renormalize, base, weight, bias,
                  max_rank):
        logits = torch.nn.functional.linear(x, Wr, router_bias)
        w, ids = molora_ops.softmax_topk(logits, k, renormalize)
        y = MF.moe_lora_linear(x, A, B, ro, w, ids, s, base=base, weight=weight, bias=bias,
                               algo="grouped", max_rank=max_rank)
        return y, logits, w, ids

    out0, grads0, _ = _routed_run(composite, p)
    assert torch.equal(out.expert_ids.long(), out0[3].long())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(out[:3], out0[:3]):
        torch.testing.assert_close(a, b, **tol)
    assert grads.keys() == grads0.keys()
    for n in grads0:
        scale = grads0[n].abs().max().item() or 1.0
        torch.testing.assert_close(grads[n].float() / scale, grads0[n].float() / scale, **tol,
                                   msg=n)


def test_routed_compile_fullgraph():
    case = ("cc", (10,), 8, 6, (3, 2, 4), 2, True, "weight", True)
    p = _routed_problem(case, dtype=torch.float32, seed=2)

    def f(x, Wr, A, B, W):
        out = MF.routed_moe_lora_linear(x, Wr, A, B, p["ro"], 2, p["s"], router_bias=p["br"],
                                        weight=W, max_rank=p["max_rank"])
        return out.y, out.router_logits

    args = [p[n].clone().requires_grad_() for n in ("x", "Wr", "A", "B", "W")]
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(*args), f(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(got[0].sum() + got[1].square().sum(), args)
    g0 = torch.autograd.grad(want[0].sum() + want[1].square().sum(), args)
    for a, b in zip(g, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(Wr=torch.randn(5, 12)), "router_weight"),
    (dict(Wr=torch.randn(4, 11)), "router_weight"),
    (dict(br=torch.randn(3)), "router_bias"),
    (dict(k=5), "top_k"),
    (dict(k=0), "top_k"),
    (dict(k=True), "top_k"),
    (dict(both=True), "not both"),
    (dict(algo="bmm"), "algo"),
])
def test_routed_errors_before_any_kernel(bad, match):
    p = _routed_problem(ROUTED_CASES[0], dtype=torch.float32)
    kw = dict(weight=p["W"], bias=p["b"])
    if "both" in bad:
        kw["base"] = torch.randn(9, 10)
    with pytest.raises(ValueError, match=f"moe_lora_linear: .*{match}"):
        MF.routed_moe_lora_linear(p["x"], bad.get("Wr", p["Wr"]), p["A"], p["B"], p["ro"],
                                  bad.get("k", 2), p["s"], router_bias=bad.get("br", p["br"]),
                                  algo=bad.get("algo", "auto"), **kw)


def _routed_op_args(dtype=torch.float32, frozen="weight", seed=1):
    p = _routed_problem(("op", (9,), 12, 10, (3, 0, 5, 2), 2, True, frozen, True), dtype, seed)
    return [p["x"].contiguous(), p["Wr"], p["br"], p["A"], p["B"], p["ro"], p["s"], p["base"],
            p["W"], p["b"], 2, True, 5]


@pytest.mark.needs_ext
@pytest.mark.parametrize("T,d_in,E,k,has_rb", [(0, 20, 5, 2, True), (1, 8, 3, 1, False),
                                               (37, 45, 13, 3, True), (64, 48, 8, 2, False),
                                               (9, 16, 16, 16, True)])
def test_routed_router_fp32_one_pass(T, d_in, E, k, has_rb):
    """The routed op's fp32 router (on an AVX-512 CPU the linear and softmax_topk in one pass
    over x's rows, csrc/cpu/router.cpp): logits within the error rule of the float64 linear
    (at most twice the fp32 composite's error), and the weights and ids exactly softmax_topk's
    on those logits; odd T (a lone last row), d_in not a multiple of 16, E past 8 and not a
    multiple of it, k = E, a non-contiguous x."""
    g = torch.Generator().manual_seed(T + E)
    x = torch.randn(d_in, T, generator=g, dtype=torch.float64).t()  # non-contiguous
    Wr = torch.randn(E, d_in, generator=g, dtype=torch.float64)
    br = torch.randn(E, generator=g, dtype=torch.float64) if has_rb else None
    R, d_out = 4 * E, 12
    A = torch.randn(R, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(d_out, R, generator=g, dtype=torch.float64)
    ro = torch.arange(E + 1, dtype=torch.int32) * 4
    f32 = [None if t is None else t.float() for t in (x, Wr, br, A, B)]
    out = molora_ops.ops.routed_moe_lora(f32[0], f32[1], f32[2], f32[3], f32[4], ro, None, None,
                                         None, None, k, True, 4)
    logits, w, ids = out[1], out[2], out[3]
    want64 = torch.nn.functional.linear(x, Wr, br)
    composite = torch.nn.functional.linear(f32[0], f32[1], f32[2]).double()
    assert logits.dtype == torch.float32 and logits.shape == (T, E)
    if T:
        assert (logits.double() - want64).abs().max() <= \
            2 * (composite - want64).abs().max() + 1e-6
    w0, ids0 = molora_ops.ops.softmax_topk(logits, k, True)
    assert torch.equal(ids, ids0) and torch.equal(w, w0)


@pytest.mark.parametrize("frozen", ["weight", "base", None])
def test_routed_op_equals_reference_and_opcheck(frozen):
    """The op's C++ CPU kernel against its reference composite (every output, the index
    outputs exactly), and torch.library.opcheck (schema, fake, autograd registration,
    aot_dispatch) with gradients wanted."""
    args = _routed_op_args(torch.float64, frozen)
    got = molora_ops.ops.routed_moe_lora(*args)
    want = ref.routed_moe_lora(*args)
    assert len(got) == len(want) == 8
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    leaves = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
              else a for a in _routed_op_args(torch.float32, frozen)]
    torch.library.opcheck(torch.ops.molora.routed_moe_lora.default, leaves)


@pytest.mark.needs_ext
@pytest.mark.parametrize("i,bad,exc,match", [
    (1, torch.randn(3, 12), ValueError, "router_weight"),
    (2, torch.randn(5), ValueError, "router_bias"),
    (8, torch.randn(10, 11), ValueError, "weight"),
    (10, 7, ValueError, "k must be in"),
    (0, torch.randn(9, 12, dtype=torch.float64), TypeError, "dtype"),
])
def test_routed_op_errors(i, bad, exc, match):
    """The op's own checks name it: called directly, bad input raises before any kernel."""
    args = _routed_op_args()
    args[i] = bad
    with pytest.raises(exc, match=f"routed_moe_lora: .*{match}"):
        molora_ops.ops.routed_moe_lora(*args)


def _cxx_autograd_calls():
    """(name, op, args, positions of the float inputs) of each op with a C++ autograd kernel
    (csrc/autograd.cpp)."""
    g = torch.Generator().manual_seed(11)
    args = _routed_op_args(torch.float64, seed=3)
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64)
    h = torch.randn(6, 9, generator=g, dtype=torch.float64)
    scores = torch.randn(6, 9, generator=g, dtype=torch.float64)
    return [
        ("routed_moe_lora", torch.ops.molora.routed_moe_lora.default, args, [0, 1, 2, 3, 4, 8, 9]),
        ("softmax_topk", torch.ops.molora.softmax_topk.default, [logits, 3, True], [0]),
        ("rank_topk", torch.ops.molora.rank_topk.default, [h, 4, scores, None, True], [0, 2]),
    ]


@pytest.mark.needs_ext
@pytest.mark.parametrize("which", ["routed_moe_lora", "softmax_topk", "rank_topk"])
# (forward_ad.make_dual loads torch's jvp decompositions through torch.jit.script, deprecated)
@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
def test_cxx_autograd_kernel_without_grad(which):
    """Where no gradient can be taken (grad mode off, or no input requiring one), the C++
    autograd kernel calls the op below autograd: the same outputs bit for bit, and no node. With
    a gradient wanted the op's C++ node is recorded; a forward-mode tangent still reaches the
    Function, which raises (the ops have no jvp) instead of dropping it."""
    name, op, args, floats = next(c for c in _cxx_autograd_calls() if c[0] == which)
    leaves = [a.clone().requires_grad_() if i in floats else a for i, a in enumerate(args)]
    with_grad = op(*leaves)
    assert with_grad[0].grad_fn is not None and \
        with_grad[0].grad_fn.name().startswith("torch::autograd::CppNode"), with_grad[0].grad_fn
    with torch.no_grad():
        off = op(*leaves)
    plain = op(*args)  # grad mode on, nothing requires a gradient
    with torch.inference_mode():
        inference = op(*args)
    for outs in (off, plain, inference):
        assert len(outs) == len(with_grad)
        for a, b in zip(outs, with_grad):
            assert a.grad_fn is None and not a.requires_grad
            assert a.dtype == b.dtype and torch.equal(a, b.detach())
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = list(args)
        dual[floats[0]] = fwAD.make_dual(args[floats[0]], torch.randn_like(args[floats[0]]))
        with pytest.raises(RuntimeError, match="jvp"):
            op(*dual)


def test_dispatched_is_shared():
    case = ("shared", 8, 8, 6, (2, 3, 4), 2, "drop")
    p = _problem(case)
    d = molora_ops.dispatch(p["ids"], 3, 1)
    y = MF.moe_lora_linear(p["x"], p["A"], p["B"], p["ro"], p["w"], p["ids"], p["s"],
                           dispatched=d)
    torch.testing.assert_close(y, _oracle(p, use_base=True) - p["base"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(algo="bmm"), ValueError, "algo"),
    (dict(ids=torch.zeros(9, 3, dtype=torch.int64)), ValueError, "expert_ids"),
    (dict(w=torch.rand(9, 3)), ValueError, "routing_weights"),
    (dict(base=torch.randn(9, 7)), ValueError, "base"),
    (dict(both=True), ValueError, "not both"),
    (dict(W=torch.randn(10, 11)), ValueError, "weight"),
    (dict(b=torch.randn(9)), ValueError, "bias"),
    (dict(ro=torch.tensor([0])), ValueError, "rank_offsets"),
])
def test_errors_before_any_kernel(bad, exc, match):
    p = _problem(CASES[0], dtype=torch.float32)
    algo = bad.get("algo", "auto")
    ids, w = bad.get("ids", p["ids"]), bad.get("w", p["w"])
    kw = dict(weight=bad.get("W", p["W"]), bias=bad.get("b", p["b"]))
    if "base" in bad or "both" in bad:
        kw = dict(base=bad.get("base", p["base"]))
        if "both" in bad:
            kw["weight"] = p["W"]
    with pytest.raises(exc, match=f"moe_lora_linear: .*{match}"):
        MF.moe_lora_linear(p["x"], p["A"], p["B"], bad.get("ro", p["ro"]), w, ids, p["s"],
                           algo=algo, **kw)


@pytest.mark.parametrize("algo", ALGOS)
def test_ids_out_of_range_is_index_error(algo):
    p = _problem(CASES[0], dtype=torch.float32)
    ids = p["ids"].clone()
    ids[0, 0] = 4
    with pytest.raises(IndexError):
        MF.moe_lora_linear(p["x"], p["A"], p["B"], p["ro"], p["w"], ids, p["s"], algo=algo)


# --- the plan ------------------------------------------------------------------------------------

H200_SHAPE = plan.Layer(T=4096, d_in=4096, d_out=4096, E=8, k=2, R=128, max_rank=16, elem=2)


def _h200():
    return plan._KNOWN["H200"]


def test_plan_h200_traffic_and_time_targets():
    """At the issue's H200 shape (bf16, T = d_in = d_out = 4096, E=8, k=2, r=16) the formulation
    the model picks moves at most 1.25x the minimum bytes, and the modeled MoE-LoRA linear costs
    at most 1.15x the base GEMM forward and 1.3x forward + backward."""
    c = _h200()
    algo = plan.choose(H200_SHAPE, "cpu", torch.bfloat16, backward=True, c=c)
    fwd, bwd = plan.launches(algo, H200_SHAPE), plan.launches(algo, H200_SHAPE, True)
    assert sum(l.bytes for l in fwd) <= 1.25 * plan.minimum_bytes(H200_SHAPE)
    base_f = plan.modeled_time(plan.base_launches(H200_SHAPE), c, torch.bfloat16)
    base_b = plan.modeled_time(plan.base_launches(H200_SHAPE, True), c, torch.bfloat16)
    t_f = plan.modeled_time(fwd, c, torch.bfloat16)
    t_b = plan.modeled_time(bwd, c, torch.bfloat16)
    assert (base_f + t_f) / base_f <= 1.15
    assert (base_f + t_f + base_b + t_b) / (base_f + base_b) <= 1.3
    # and the grouped form moves k copies of x: the model knows why it loses here
    grouped = sum(l.bytes for l in plan.launches("grouped", H200_SHAPE))
    assert grouped > sum(l.bytes for l in fwd)


def test_plan_prefers_grouped_where_dense_flops_dominate():
    """Large total rank (E=64, r=64: R=4096) on the same GPU: the dense FLOPs (E/k = 8x) make it
    compute-bound, and the grouped form wins; on a compute-poor device the switch comes early."""
    big = plan.Layer(T=4096, d_in=4096, d_out=4096, E=64, k=8, R=4096, max_rank=64, elem=2)
    assert plan.choose(big, "cpu", torch.bfloat16, True, ("grouped", "dense"), c=_h200()) == \
        "grouped"
    slow = plan.Ceilings("2-core CPU", 1e10, {torch.float32: 1e11}, 5e-6)
    cpu_shape = plan.Layer(T=1024, d_in=512, d_out=1376, E=8, k=2, R=128, max_rank=16, elem=4)
    assert plan.choose(cpu_shape, "cpu", torch.float32, True, ("grouped", "dense"),
                       c=slow) == "grouped"


def test_plan_counts_every_op_of_a_composite():
    """A launch's ``ops`` each pay the launch cost, and the dense form's gate (a torch composite:
    range check + 6 ops) is modeled as what it runs: at the 2-core CPU's ceilings a T=16 forward
    picks grouped, which ran 345 us against dense's 391 (as one launch the gate tipped it)."""
    c = plan.Ceilings("2-core CPU", 5.6e10, {torch.float32: 3.75e11}, 5e-6)
    one, three = plan.Launch("a", 8, 8, 0), plan.Launch("a", 8, 8, 0, ops=3)
    extra = plan.modeled_time([three], c, torch.float32) - plan.modeled_time([one], c, torch.float32)
    assert extra == pytest.approx(2 * c.launch)
    assert plan.launches("dense", H200_SHAPE)[0].ops > 1
    t16 = plan.Layer(T=16, d_in=512, d_out=1376, E=8, k=2, R=128, max_rank=16, elem=4)
    assert plan.choose(t16, "cpu", torch.float32, False, ("grouped", "dense"), c=c) == "grouped"


def test_plan_choice_is_remembered_until_set_ceilings(monkeypatch):
    """plan.choose at the device's own ceilings models the formulations once per shape and
    remembers the choice; set_ceilings forgets it, so new ceilings take effect at once."""
    orig = plan.ceilings("cpu")
    modeled = []
    real_launches = plan.launches
    monkeypatch.setattr(plan, "launches", lambda *a, **kw: modeled.append(a) or
                        real_launches(*a, **kw))
    shape = plan.Layer(T=1024, d_in=512, d_out=1376, E=8, k=2, R=128, max_rank=16, elem=4)
    try:
        # memory-starved: the dense form moves x once; compute-starved: grouped does 8x less math
        plan.set_ceilings("cpu", plan.Ceilings("mem", 1e8, {torch.float32: 1e15}, 0.0))
        assert plan.choose(shape, "cpu", torch.float32, True, ("grouped", "dense")) == "dense"
        n = len(modeled)
        assert n > 0
        assert plan.choose(shape, "cpu", torch.float32, True, ("grouped", "dense")) == "dense"
        assert len(modeled) == n
        plan.set_ceilings("cpu", plan.Ceilings("math", 1e15, {torch.float32: 1e8}, 0.0))
        assert plan.choose(shape, "cpu", torch.float32, True, ("grouped", "dense")) == "grouped"
        assert len(modeled) > n
    finally:
        plan.set_ceilings("cpu", orig)


def test_plan_choose_for_is_choose_and_forgets_with_set_ceilings():
    """choose_for (the layer's hot path, keyed by plain arguments) gives choose's answer, models
    once per key, and takes new ceilings at once."""
    orig = plan.ceilings("cpu")
    dims = (1024, 512, 1376, 8, 2, 128, 16, 4, True)
    opts = ("grouped", "dense")
    try:
        for c, want in ((plan.Ceilings("mem", 1e8, {torch.float32: 1e15}, 0.0), "dense"),
                        (plan.Ceilings("math", 1e15, {torch.float32: 1e8}, 0.0), "grouped")):
            plan.set_ceilings("cpu", c)
            got = plan.choose_for(*dims, "cpu", torch.float32, True, opts)
            assert got == want == plan.choose(plan.Layer(*dims), "cpu", torch.float32, True, opts)
            # a remembered choice is not modeled again
            n = len(plan._CHOICES)
            assert plan.choose_for(*dims, "cpu", torch.float32, True, opts) == want
            assert len(plan._CHOICES) == n
    finally:
        plan.set_ceilings("cpu", orig)


def test_plan_launch_bytes_are_consistent():
    for algo in ALGOS:
        for bwd in (False, True):
            for launch in plan.launches(algo, H200_SHAPE, bwd):
                assert launch.read > 0 and launch.write > 0 and launch.flops >= 0, launch
    assert plan.minimum_bytes(H200_SHAPE) == (3 * 4096 * 4096 + 2 * 128 * 4096) * 2


def test_auto_never_picks_fused_without_the_kernel():
    x = torch.randn(64, 32)
    assert MF.pick_algo(x, torch.randn(16, 32), torch.randn(24, 16), 4, 2, 4) in (
        "grouped", "dense")


# --- the GPU path -------------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("algo", ["grouped", "dense"])
def test_gpu_path_reads_nothing(algo):
    """On the code a GPU runs (Triton in the interpreter, device-form checks) the entry makes no
    host read: forward and backward, k = 2 (the token-owned expand)."""
    host_reads = pytest.importorskip("host_reads")
    from molora_ops import backend
    if not backend.has_triton():
        pytest.skip("triton is not installed")
    p = _problem(CASES[0], dtype=torch.float32, seed=4)
    with backend.gpu_path_on_cpu("triton"):
        _run(p, algo)  # first-call binding
        with host_reads.count_host_reads() as reads:
            y, grads = _run(p, algo)
    ours = reads.under("molora_ops/")
    assert not ours, reads.report(ours)
    y0, grads0 = _run(p, "grouped")
    torch.testing.assert_close(y, y0, rtol=1e-4, atol=1e-4)
    for n in grads0:
        torch.testing.assert_close(grads[n], grads0[n], rtol=1e-4, atol=1e-4, msg=n)


@pytest.mark.triton
def test_triton_expand_has_no_row_buffer(monkeypatch):
    """k > 1: the Triton expand allocates nothing of P rows (no fp32 [P, d_out] buffer)."""
    from molora_ops import backend
    if not backend.has_triton():
        pytest.skip("triton is not installed")
    from molora_ops.triton import sgmv as ts
    T, k, E, r, d_out = 10, 3, 4, 4, 24
    ids = torch.randint(0, E, (T, k))
    order, pos, eo = ref.dispatch(ids, E, 1)
    ro = molora_ops.uniform_rank_offsets(E, r)
    h, B = torch.randn(T * k, r), torch.randn(d_out, E * r)
    shapes = []
    for name in ("empty", "zeros"):
        orig = getattr(torch, name)

        def spy(*size, _orig=orig, **kw):
            shapes.append(tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list))
                          else tuple(size))
            return _orig(*size, **kw)

        monkeypatch.setattr(ts.torch, name, spy)
    y = ts.sgmv_expand(h, B, ro, order, pos, eo, torch.rand(T, k), None, torch.randn(T, d_out))
    monkeypatch.undo()
    assert y.shape == (T, d_out)
    assert all(s[:1] != (T * k,) for s in shapes), shapes


# --- the CPU expand's paths (dense <= 32 tokens; then token tiles on AVX2 fp32, else token-owned
# below 128 tokens and column blocks from 128) and the weight gradient's ---------------------------


@pytest.mark.parametrize("T", [1, 32, 33, 127, 128, 301])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [150, 600])
def test_cpu_expand_paths(T, k, dtype, n):
    """Every batch size regime of the C++ sgmv_expand against the reference: ragged ranks with a
    rank-0 expert and one above 64, n = 150 (a narrow last 16-column chunk, two block groups) and
    600 (several column panels of the AVX2 token tiles, the last one partial), dropped slots and
    repeated ids, with and without weights / scales / base. k = 2 on AVX-512 fp32 from 128 tokens
    on: the tokens grouped by their pair of experts (at most 15 pairs of the 4 live experts)."""
    g, ro, meta, h, (w, s) = _ragged_grouped(T * 10 + k, T, k, [3, 0, 70, 2, 9], dtype)
    R = int(ro[-1])
    B = torch.randn(n, R, generator=g, dtype=torch.float64).to(dtype)
    base = torch.randn(T, n, generator=g, dtype=torch.float64).to(dtype)
    for args in ((w, s, base), (None, None, None)):
        y = molora_ops.sgmv_expand(h, B, ro, *meta, *args)
        want = ref.sgmv_expand(h.double(), B.double(), ro, *meta,
                               *[a if a is None else a.double() for a in args])
        _assert_near(y, want, dtype)


@pytest.mark.parametrize("layout", ["rows", "padded", "strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 3])
def test_cpu_expand_bank_layouts(layout, dtype, k):
    """The token-tile expand reads the bank as B^T [R, n]: B given row-major, as a narrow slice of
    a wider bank (row stride > R), with strided columns, or as the transpose of a row-major
    [R, n] (used in place). R = 85 and n = 150: partial 32 x 32 transpose blocks and a partial
    4 x 4 piece on both sides. k = 2: the pair-grouped expand (AVX-512 fp32), its bank
    transposed chunk by chunk (B^T given row-major keeps the token tiles)."""
    T, n = 301, 150
    g, ro, meta, h, (w, s) = _ragged_grouped(7, T, k, [3, 0, 70, 2, 10], dtype)
    R = int(ro[-1])
    full = torch.randn(R + 3, 2 * n, generator=g, dtype=torch.float64).to(dtype)
    B = {"rows": full[:R, :n].t().contiguous(), "padded": full.t()[:n].contiguous()[:, :R],
         "strided": full[:R, ::2].t(), "transposed": full[:R, :n].contiguous().t()}[layout]
    assert B.shape == (n, R) and B.is_contiguous() == (layout == "rows")
    y = molora_ops.sgmv_expand(h, B, ro, *meta, w, s, None)
    want = ref.sgmv_expand(h.double(), B.double(), ro, *meta, w.double(), s.double(), None)
    _assert_near(y, want, dtype)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("layout", ["rows", "transposed"])
@pytest.mark.parametrize("k", [2, 3])
def test_cpu_expand_column_panels(threads, layout, k):
    """fp32 token tiles over panels of columns: a row-major B is transposed panel by panel with
    the columns split between the threads (n = 2000 at T = 300 takes 864-column panels: one
    thread runs three, the last partial, two threads two each, the second partial, three threads
    one of 672 each); B^T given row-major is read in place, the token tiles split between the
    threads. k = 2 (AVX-512) with a row-major B: the pair groups, the columns split between the
    threads. Rank-0 and empty experts, a base, dropped slots. Against the reference."""
    T, n = 300, 2000
    g, ro, meta, h, (w, s) = _ragged_grouped(11, T, k, [3, 0, 17, 2, 9], torch.float32)
    R = int(ro[-1])
    B = torch.randn(n, R, generator=g)
    B = B if layout == "rows" else B.t().contiguous().t()
    base = torch.randn(T, n, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = molora_ops.sgmv_expand(h, B, ro, *meta, w, s, base)
        y0 = molora_ops.sgmv_expand(h, B, ro, *meta, None, None, None)
    finally:
        torch.set_num_threads(before)
    want = ref.sgmv_expand(h.double(), B.double(), ro, *meta, w.double(), s.double(),
                           base.double())
    _assert_near(y, want, torch.float32)
    _assert_near(y0, ref.sgmv_expand(h.double(), B.double(), ro, *meta, None, None, None),
                 torch.float32)


@pytest.mark.parametrize("case", ["uniform", "many pairs", "one pair", "one live"])
@pytest.mark.parametrize("with_base", [False, True])
def test_cpu_expand_pair_groups(case, with_base):
    """fp32 top-2 expand on the CPU, T = 301, n = 515 (a narrow last chunk), against the
    reference. With AVX-512 the tokens are grouped by their pair of experts where the groups hold
    8 tokens on average: E = 8 uniform routing (at most 36 pairs); every token on one pair; one
    live expert per token (the other dropped, or of rank 0); E = 40 (hundreds of pairs: the token
    tiles instead). Ragged ranks (16, 8 and 0) and repeated ids."""
    T, n = 301, 515
    g = torch.Generator().manual_seed(["uniform", "many pairs", "one pair", "one live"].index(case))
    E = 40 if case == "many pairs" else 8
    ranks = [16, 16, 8, 16, 0, 16, 16, 12] if E == 8 else [16] * E
    ro = torch.tensor([0] + ranks).cumsum(0).to(torch.int32)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    if case == "one pair":
        ids = torch.tensor([[5, 2]]).repeat(T, 1)
        ids[::2] = torch.tensor([2, 5])  # the pair in either order
    elif case == "one live":
        ids[:, 1] = torch.where(torch.arange(T) % 2 == 0, -1, 4)  # dropped, or rank 0
    ids[::9, 1] = ids[::9, 0]  # repeated ids
    order, pos, eo = molora_ops.dispatch(ids, E, 1)
    h = torch.randn(order.numel(), 16, generator=g)
    B = torch.randn(n, int(ro[-1]), generator=g)
    w, s = torch.rand(T, 2, generator=g), torch.rand(E, generator=g) + 0.5
    base = torch.randn(T, n, generator=g) if with_base else None
    y = molora_ops.sgmv_expand(h, B, ro, order, pos, eo, w, s, base)
    want = ref.sgmv_expand(h.double(), B.double(), ro, order, pos, eo, w.double(), s.double(),
                           None if base is None else base.double())
    _assert_near(y, want, torch.float32)


@pytest.mark.parametrize("strided", [False, True], ids=["rows", "padded"])
@pytest.mark.parametrize("most_rows", [1, 3, 4, 9])
def test_cpu_shrink_packs_only_experts_with_rows(most_rows, strided):
    """fp32 shrink on the CPU: with fewer than 4 rows in every expert a row-major bank is read
    where it lies; from 4 on, or for a bank with a padded row stride, it is packed, only for the
    experts that have rows (here 2 of 6 are empty, one with rank 0). Against the reference."""
    E, d, ranks = 6, 150, [16, 0, 17, 5, 70, 3]
    ro = torch.tensor([0] + ranks).cumsum(0).to(torch.int32)
    rows = {0: most_rows, 1: 1, 2: max(most_rows - 1, 1), 4: min(2, most_rows)}  # 3, 5 empty
    ids = torch.tensor([e for e, n in rows.items() for _ in range(n)]).reshape(-1, 1)
    order, pos, eo = molora_ops.dispatch(ids, E, 1)
    assert int((eo[1:] - eo[:-1]).max()) == most_rows
    g = torch.Generator().manual_seed(most_rows)
    x = torch.randn(ids.shape[0], d, generator=g)
    A = torch.randn(int(ro[-1]), d + 7, generator=g)[:, :d]  # row stride d + 7
    A = A if strided else A.contiguous()
    w, s = torch.rand(ids.shape, generator=g), torch.rand(E, generator=g) + 0.5
    h = molora_ops.sgmv_shrink(x, A, ro, order, pos, eo, w, s, max_rank=70)
    want = ref.sgmv_shrink(x.double(), A.double(), ro, order, pos, eo, w.double(), s.double(),
                           max_rank=70)
    _assert_near(h, want, torch.float32)


def test_cpu_avx2_copy_where_avx512_serves():
    """On a CPU with AVX-512 the fp32 shrink, expand and weight gradient run their AVX-512 copies
    in every test; the AVX2 copies, what AVX2-only CPUs run, are tested here in a process started
    with MOLORA_CPU_ISA=avx2: the shrink, expand and weight-gradient tests of this file and
    test_sgmv.py. (Without AVX-512 every test runs the AVX2 copy, and the AVX-512 one cannot
    run.)"""
    import os
    import subprocess
    import sys
    try:
        with open("/proc/cpuinfo") as f:
            avx512 = "avx512f" in f.read()
    except OSError:
        avx512 = False
    if not avx512:
        pytest.skip("no AVX-512 here: the other tests run the AVX2 copy")
    assert os.environ.get("MOLORA_CPU_ISA") != "avx2", "must not run inside its own subprocess"
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-k", "(shrink or expand or weight_grad) and not avx2_copy",
         os.path.join(here, "test_functional.py"), os.path.join(here, "test_sgmv.py")],
        env=dict(os.environ, MOLORA_CPU_ISA="avx2"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and " passed" in r.stdout, (r.stdout + r.stderr)[-4000:]


def _ragged_grouped(seed, T, k, ranks, dtype):
    """(generator, rank_offsets, (order, pos, expert_offsets), h [P, 70], (weights, scales)) of
    random ids in [-1, E) (dropped slots, repeated ids) over the ragged `ranks`."""
    g = torch.Generator().manual_seed(seed)
    E = len(ranks)
    ro = torch.tensor([0] + ranks).cumsum(0).to(torch.int32)
    ids = torch.randint(-1, E, (T, k), generator=g)
    meta = molora_ops.dispatch(ids, E, 1)
    h = torch.randn(meta[0].numel(), 70, generator=g, dtype=torch.float64).to(dtype)
    return g, ro, meta, h, (torch.rand(T, k, generator=g), torch.rand(E, generator=g) + 0.5)


def _assert_near(got, want, dtype):
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert got.dtype == dtype
    assert (got.double() - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("T", [1, 40, 301])
@pytest.mark.parametrize("d", [16, 150])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_weight_grad_paths(T, d, dtype):
    """The C++ sgmv_weight_grad (fp32: the register-tiled kernel on AVX2; the row-blocked and BLAS
    paths otherwise) against the reference: ragged ranks with a rank-0 expert, one of 70 (several
    6-row blocks and a partial one) and a rank above 16 (BLAS), d = 150 (a narrow last column
    chunk) and 16 (one chunk), dropped slots and repeated ids, with and without weights / scales."""
    g, ro, meta, h, (w, s) = _ragged_grouped(T * 7 + d, T, 3, [3, 0, 70, 2, 17], dtype)
    R = int(ro[-1])
    x = torch.randn(T, d, generator=g, dtype=torch.float64).to(dtype)
    for args in ((w, s), (None, None)):
        want = ref.sgmv_weight_grad(x.double(), h.double(), ro, *meta,
                                    *[a if a is None else a.double() for a in args], R)
        G = molora_ops.sgmv_weight_grad(x, h, ro, *meta, *args, total_rank=R)
        assert G.shape == (R, d)
        _assert_near(G, want, dtype)
        # G^T in B's layout: the same numbers (each path turns its own G round)
        Gt = molora_ops.sgmv_weight_grad(x, h, ro, *meta, *args, total_rank=R, transposed=True)
        assert Gt.shape == (d, R) and Gt.is_contiguous()
        assert torch.equal(Gt, G.t())


@pytest.mark.parametrize("T", [1, 40, 301])
@pytest.mark.parametrize("d", [16, 150, 151])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_shrink_paths(T, d, dtype):
    """The C++ sgmv_shrink (fp32: the register-tiled kernel on AVX2 / AVX-512, which reads the
    bank packed; the portable kernel otherwise) against the reference: ragged ranks with a rank-0
    expert, one of 70 (four full 16-rank chunks and a partial one), 17 (a one-rank chunk) and 13
    (a wide chunk short of 16: on AVX-512 in column pairs, its last ranks zero), ranks 3 and 2
    (the narrow column-pair panels; d = 151 leaves a last odd column, paired with zeros), the bank
    given rank-major and as the transposed view the backward's u passes (B^T), dropped slots and
    repeated ids (partial 6-row tiles), with and without weights / scales."""
    g, ro, meta, _, (w, s) = _ragged_grouped(T * 5 + d, T, 3, [3, 0, 70, 2, 17, 13], dtype)
    R = int(ro[-1])
    x = torch.randn(T, d, generator=g, dtype=torch.float64).to(dtype)
    A = torch.randn(R, d, generator=g, dtype=torch.float64).to(dtype)
    for bank in (A, A.t().contiguous().t()):
        for args in ((w, s), (None, None)):
            h = molora_ops.sgmv_shrink(x, bank, ro, *meta, *args, max_rank=72)
            want = ref.sgmv_shrink(x.double(), A.double(), ro, *meta,
                                   *[a if a is None else a.double() for a in args], max_rank=72)
            assert h.shape == (meta[0].numel(), 72)
            _assert_near(h, want, dtype)
