"""Auxiliary losses (molora_ops/modules/losses.py) vs straightforward loop implementations written
here from the formulas of METHODS.md: values, gradients (vs the loop's autograd gradient and
gradcheck in float64), attention masks with padding, -1 dropped ids, E = 7, T = 1, per-layer lists,
q == 1, the aux-loss-free bias update, and bad inputs."""
import ast
import importlib
import math
import os

import pytest
import torch

import molora_ops
from utils import tie_free_logits  # global RNG, seeded per test by the autouse ``seed`` fixture

losses = importlib.import_module("molora_ops.modules.losses")


# ------------------------------------------------------------------ inputs

@pytest.fixture
def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand_probs(gen, *shape, dtype=torch.float64, scale=1.5):
    """Strictly positive random softmax rows (never uniform / one-hot)."""
    z = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    return torch.softmax(z, dim=-1).to(dtype)


def rand_ids(gen, T, E, k, drop=0.25):
    """[T, k] int64 distinct experts per row; a random ~drop fraction set to -1 (always one)."""
    ids = torch.argsort(torch.rand(T, E, generator=gen), dim=1)[:, :k].clone()
    if drop:
        ids[torch.rand(T, k, generator=gen) < drop] = -1
        ids[0, -1] = -1
    return ids


def pad_mask(gen, B, S):
    """[B, S] bool right-padding mask: every row keeps >= 1 token, at least one row is padded."""
    lengths = torch.randint(1, S + 1, (B,), generator=gen)
    if S > 1:
        lengths[0] = torch.randint(1, S, (1,), generator=gen)
    return torch.arange(S)[None, :] < lengths[:, None]


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def close(actual, expected, dtype=torch.float32):
    tol = dict(rtol=1e-5, atol=1e-6) if dtype != torch.float64 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected).double(), **tol)


def check_value_and_grad(fn, loop, inputs, dtype):
    """fn on ``inputs`` cast to dtype vs loop on their float64 values: value, then d/d every input."""
    ours_in = [leaf(x.to(dtype)) for x in inputs]
    ref_in = [leaf(x.double()) for x in inputs]
    ours, expect = fn(*ours_in), loop(*ref_in)
    assert ours.dim() == 0
    assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    close(ours, expect, dtype)
    g_ours = torch.autograd.grad(ours, ours_in)
    g_ref = torch.autograd.grad(expect, ref_in)
    for a, b in zip(g_ours, g_ref):
        close(a, b, dtype)


# ------------------------------------------------------------------ loop references

def loop_mixtral(probs, ids, keep=None):
    """E * sum_{j,e} f[j,e] P[e], f[j,e] = mean_t 1[ids[t,j]==e], P[e] = mean_t p[t,e] (kept t)."""
    T, E = probs.shape
    toks = [t for t in range(T) if keep is None or bool(keep[t])]
    n = len(toks)
    total = probs.sum() * 0
    for e in range(E):
        P = sum(probs[t, e] for t in toks) / n
        for j in range(ids.shape[1]):
            f = sum(1 for t in toks if int(ids[t, j]) == e) / n
            total = total + f * P
    return E * total


def loop_entropy(row, q, normalize=True, eps=1e-5):
    E = len(row)
    pe = [v + eps for v in row]
    if E == 1:
        return row[0] * 0
    if q == 1:
        H = -sum(v * torch.log(v) for v in pe)
        Hmax = math.log(E)
    else:
        H = (1 - sum(v ** q for v in pe)) / (q - 1)
        Hmax = (1 - E ** (1 - q)) / (q - 1)
    return H / Hmax if normalize else H


def loop_masked_token_mean(values, keep):
    kept = [v for t, v in enumerate(values) if keep is None or bool(keep[t])]
    return sum(kept) / len(kept)


# ------------------------------------------------------------------ Mixtral / Switch

MIX_CASES = [  # (B, S, E, k): MixLoRA E=8 k=2, E=7, T=1, k=3
    (2, 8, 8, 2), (3, 5, 7, 3), (1, 1, 8, 2), (4, 3, 7, 1),
]


@pytest.mark.parametrize("B,S,E,k", MIX_CASES, ids=[f"B{b}S{s}E{e}k{k}" for b, s, e, k in MIX_CASES])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_mixtral_matches_loop(gen, B, S, E, k, masked, dtype):
    T = B * S
    probs = rand_probs(gen, T, E)
    ids = rand_ids(gen, T, E, k, drop=0.25 if T > 1 else 0)
    mask = pad_mask(gen, B, S) if masked else None
    keep = None if mask is None else mask.reshape(-1)
    check_value_and_grad(lambda p: losses.mixtral_load_balancing_loss(p, ids, E, attention_mask=mask),
                         lambda p: loop_mixtral(p, ids, keep), [probs], dtype)


def test_mixtral_hand_value():
    # T=2, E=2, k=1, both tokens to expert 0: f = [1, 0], P = [(0.7+0.4)/2, (0.3+0.6)/2] = [0.55, 0.45]
    # L = E * (1 * 0.55 + 0 * 0.45) = 2 * 0.55 = 1.1
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    ids = torch.tensor([[0], [0]])
    close(losses.mixtral_load_balancing_loss(probs, ids), 1.1)
    # padding the second token: f = [1, 0], P = [0.7, 0.3] -> L = 2 * 0.7 = 1.4
    close(losses.mixtral_load_balancing_loss(probs, ids, attention_mask=torch.tensor([1, 0])), 1.4)


def test_mixtral_layer_list_and_hf_convention(gen):
    B, S, E, k, L = 2, 5, 8, 2, 3
    probs = [rand_probs(gen, B, S, E) for _ in range(L)]
    ids = [rand_ids(gen, B * S, E, k).reshape(B, S, k) for _ in range(L)]
    mask = pad_mask(gen, B, S).long()  # HF attention masks are int64 0/1
    cat_p = torch.cat([p.reshape(-1, E) for p in probs])
    cat_i = torch.cat([i.reshape(-1, k) for i in ids])
    keep = mask.reshape(-1).bool().repeat(L)
    expect = loop_mixtral(cat_p, cat_i, keep)
    close(losses.mixtral_load_balancing_loss(probs, ids, attention_mask=mask), expect)
    close(losses.mixtral_load_balancing_loss(tuple(probs), tuple(ids), attention_mask=mask), expect)
    # one tensor of L*B*S rows with a [B, S] mask (HF load_balancing_loss_func)
    close(losses.mixtral_load_balancing_loss(cat_p, cat_i, attention_mask=mask), expect)
    # a list of probs with the ids as one tensor of all rows
    close(losses.mixtral_load_balancing_loss(probs, cat_i, attention_mask=mask), expect)


def test_mixtral_bf16_input_computes_in_fp32(gen):
    probs = rand_probs(gen, 12, 8, dtype=torch.bfloat16)
    ids = rand_ids(gen, 12, 8, 2)
    out = losses.mixtral_load_balancing_loss(probs, ids)
    assert out.dtype == torch.float32
    close(out, loop_mixtral(probs.double(), ids))


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_switch_matches_loop(gen, masked):
    B, S, E = 3, 6, 7
    T = B * S
    probs = rand_probs(gen, T, E)
    ids = rand_ids(gen, T, E, 1, drop=0.2)[:, 0]  # -1 = dropped over capacity
    mask = pad_mask(gen, B, S) if masked else None
    keep = None if mask is None else mask.reshape(-1)

    def loop(p):  # E^2 * mean_e(f_e * P_e)
        toks = [t for t in range(T) if keep is None or bool(keep[t])]
        n = len(toks)
        acc = p.sum() * 0
        for e in range(E):
            f = sum(1 for t in toks if int(ids[t]) == e) / n
            acc = acc + f * sum(p[t, e] for t in toks) / n
        return E ** 2 * acc / E

    check_value_and_grad(lambda p: losses.switch_load_balancing_loss(p, ids, attention_mask=mask), loop,
                         [probs], torch.float32)
    close(losses.switch_load_balancing_loss(probs, ids[:, None], attention_mask=mask),
          losses.switch_load_balancing_loss(probs, ids, attention_mask=mask), torch.float64)


def test_router_z_loss_matches_loop(gen):
    B, S, E, L = 2, 4, 7, 2
    logits = [torch.randn(B, S, E, generator=gen, dtype=torch.float64) * 3 for _ in range(L)]
    mask = pad_mask(gen, B, S)
    keep = mask.reshape(-1).repeat(L)

    def loop(*zs):
        rows = [z.reshape(-1, E)[t] for z in zs for t in range(B * S)]
        lse = [torch.log(sum(torch.exp(r[e]) for e in range(E))) ** 2 for r in rows]
        return loop_masked_token_mean(lse, keep)

    check_value_and_grad(lambda *zs: losses.router_z_loss(list(zs), attention_mask=mask), loop, logits,
                         torch.float32)
    # single tensor, no mask: plain mean over tokens
    z = logits[0].reshape(-1, E)
    close(losses.router_z_loss(z), loop_masked_token_mean([torch.logsumexp(r, 0) ** 2 for r in z], None),
          torch.float64)


# ------------------------------------------------------------------ Tsallis entropy / DynMoLE

@pytest.mark.parametrize("q", [1.1, 1.0, 2.0, 0.5])
@pytest.mark.parametrize("E", [7, 6, 1])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_tsallis_entropy_matches_loop(gen, q, E, normalize):
    probs = rand_probs(gen, 2, 3, E)  # any leading dims

    def loop(p):
        return torch.stack([loop_entropy(list(p[a, b]), q, normalize) for a in range(2) for b in range(3)])

    ours_in, ref_in = leaf(probs.float()), leaf(probs)
    H = losses.tsallis_entropy(ours_in, q=q, normalize=normalize)
    assert H.shape == (2, 3) and H.dtype == torch.float32
    expect = loop(ref_in).reshape(2, 3)
    close(H, expect)
    if E == 1:
        assert torch.equal(H, torch.zeros(2, 3))
    w = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    g = torch.autograd.grad((H * w.float()).sum(), ours_in)[0]
    g_ref = torch.autograd.grad((expect * w).sum(), ref_in)[0]
    close(g, g_ref)


@pytest.mark.parametrize("q", [1.1, 1.0, 2.0])
def test_tsallis_entropy_agrees_with_softmax_topp(gen, q):
    """softmax_topp broadcasts a token to every expert iff its normalised entropy > threshold: the
    thresholds are put midway between consecutive entropies of ours, so any formula mismatch flips."""
    T, E = 64, 7
    logits = tie_free_logits(T, E, row_scale=(0.05, 1.5))
    H = losses.tsallis_entropy(torch.softmax(logits.float(), dim=-1), q=q)
    Hs = H.double().sort().values
    gaps = Hs[1:] - Hs[:-1]
    for i in [int(gaps[T // 4: 3 * T // 4].argmax()) + T // 4, int(gaps[: T // 4].argmax())]:
        assert gaps[i] > 1e-4, "test data: entropies too close together"
        thr = float((Hs[i] + Hs[i + 1]) / 2)
        if not thr < 1:
            continue
        _, ids = molora_ops.softmax_topp(logits, 1e-6, 1, thr, q, 1e-5)
        broadcast = (ids >= 0).all(dim=-1)
        assert torch.equal(broadcast, H > thr)


def loop_dynmole(p, w, keep, ec=0.01, bc=0.001, q=1.1):
    T, E = p.shape
    H = [loop_entropy(list(p[t]), q) for t in range(T)]
    ent = loop_masked_token_mean(H, keep)
    bal = 0
    for e in range(E):
        f = loop_masked_token_mean([w[t, e] for t in range(T)], keep)
        P = loop_masked_token_mean([p[t, e] for t in range(T)], keep)
        bal = bal + f * P
    return ec * ent + bc * E * bal


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_dynmole_published_routing(gen, masked):
    """DynMoLE template: E=6, top_p 0.75, keep_top_k 2, threshold 0.9, q 1.1; default coefficients."""
    B, S, E = 3, 5, 6
    logits = tie_free_logits(B * S, E, row_scale=(0.1, 1.5))
    probs = torch.softmax(logits.double(), dim=-1)
    w_sorted, ids = molora_ops.softmax_topp(logits.double(), 0.75, 2, 0.9, 1.1, 1e-5)
    weights = torch.zeros_like(probs).scatter_add_(1, ids.long().clamp(min=0), w_sorted * (ids >= 0))
    assert (weights == 0).any() and (weights > 0).sum() >= 2 * B * S  # some experts masked, >= min_k kept
    mask = pad_mask(gen, B, S) if masked else None
    keep = None if mask is None else mask.reshape(-1)
    check_value_and_grad(lambda p, w: losses.dynmole_loss(p, w, attention_mask=mask),
                         lambda p, w: loop_dynmole(p, w, keep), [probs, weights], torch.float32)


@pytest.mark.parametrize("q", [1.1, 1.0])
def test_dynmole_coefficients_and_lists(gen, q):
    E, L, T = 7, 2, 9
    probs = [rand_probs(gen, T, E) for _ in range(L)]
    weights = [p * (torch.rand(T, E, generator=gen, dtype=torch.float64) < 0.5) for p in probs]
    mask = torch.rand(T, generator=gen) < 0.7
    mask[0] = True
    keep = mask.repeat(L)
    ours = losses.dynmole_loss(probs, weights, entropy_coef=0.3, balance_coef=0.05, q=q, attention_mask=mask)
    close(ours, loop_dynmole(torch.cat(probs), torch.cat(weights), keep, 0.3, 0.05, q))


# ------------------------------------------------------------------ MoLA / LLaVA-MoLE

def loop_mola_module(p, ids):
    T, E = p.shape
    counts = [sum(1 for t in range(T) for j in range(ids.shape[1]) if int(ids[t, j]) == e) for e in range(E)]
    routed = sum(counts)
    return E * sum(counts[e] / routed * sum(p[t, e] for t in range(T)) / T for e in range(E))


def test_mola_matches_loop(gen):
    T, E, k = 11, 8, 2
    probs = rand_probs(gen, T, E)
    ids = rand_ids(gen, T, E, k)
    check_value_and_grad(lambda p: losses.mola_balance_loss(p, ids), lambda p: loop_mola_module(p, ids),
                         [probs], torch.float32)
    # no dropped slot: f_e = count_e / (T*k), as the docs write it
    full = rand_ids(gen, T, E, k, drop=0)
    counts = torch.bincount(full.flatten(), minlength=E).double()
    close(losses.mola_balance_loss(probs, full, num_experts=E),
          E * (counts / (T * k) * probs.mean(0)).sum(), torch.float64)


def test_mola_per_module_form_sums_each_module(gen):
    """The per-module form (NOT MoLA's loss, kept under its own name): modules with 2, 4, 6, 8
    experts (top-2), each module's loss on its own rows, summed."""
    T = 7
    probs = [rand_probs(gen, T, E) for E in (2, 4, 6, 8)]
    ids = [rand_ids(gen, T, p.shape[1], 2) for p in probs]
    inputs = probs

    def loop(*ps):
        return sum(loop_mola_module(p, i) for p, i in zip(ps, ids))

    check_value_and_grad(lambda *ps: losses.mola_balance_loss_per_module(list(ps), ids), loop,
                         inputs, torch.float32)


def authors_mola_loss(layer_logits, top_k):
    """The MoLA authors' loss, written from ``GCYZSL/MoLA`` (``mola_modeling_llama_hacked.py``):
    each decoder layer concatenates its modules' router logits along dim 0; then per layer
    ``routing_weights = softmax(logits)``, ``selected = topk(routing_weights, k).indices``,
    ``expert_mask = one_hot(selected.reshape(-1), E).sum(-2)``, ``tokens_per_expert =
    expert_mask / expert_mask.sum()``, ``router_prob = routing_weights.mean(0)``,
    ``layer_loss = sum(tokens_per_expert * router_prob) * E``; summed over layers."""
    overall = 0.0
    for modules in layer_logits:
        z = torch.cat(modules, dim=0)
        E = z.shape[-1]
        w = torch.softmax(z, dim=-1)
        _, sel = torch.topk(w, top_k[E] if isinstance(top_k, dict) else top_k, dim=-1)
        mask = torch.nn.functional.one_hot(sel.reshape(-1), E).sum(dim=-2).to(w.dtype)  # fp64 here
        overall = overall + (mask / mask.sum() * w.mean(dim=0)).sum() * E
    return overall


def test_mola_is_one_loss_per_decoder_layer_as_the_authors(gen):
    """Random router logits of 3 decoder layers (E_l = 2, 4, 8, MoLA-triangle style) x 7 modules
    each: ``mola_balance_loss`` of per-layer lists equals the authors' formula (value and gradient
    w.r.t. the logits), and the old per-module sum is ~7x larger."""
    T, k, n_mod = 9, 2, 7
    logits = [[torch.randn(T, E, generator=gen, dtype=torch.float64) * 2 for _ in range(n_mod)]
              for E in (2, 4, 8)]
    flat = [z for layer in logits for z in layer]
    ids = [[torch.softmax(z, -1).topk(k, dim=-1).indices for z in layer] for layer in logits]

    def ours(*zs):
        it = iter(zs)
        probs = [[torch.softmax(next(it), -1) for _ in range(n_mod)] for _ in logits]
        return losses.mola_balance_loss(probs, ids)

    def ref(*zs):
        it = iter(zs)
        return authors_mola_loss([[next(it) for _ in range(n_mod)] for _ in logits], k)

    for dtype in (torch.float32, torch.float64):
        check_value_and_grad(ours, ref, flat, dtype)
    value = float(ref(*flat))
    per_module = float(losses.mola_balance_loss_per_module(
        [torch.softmax(z, -1) for z in flat], [i for layer in ids for i in layer]))
    assert 5 * value < per_module < 8 * value   # one term per module instead of per layer
    # one layer: the list of its modules equals the tensor of their concatenated rows
    p0 = [torch.softmax(z, -1) for z in logits[1]]
    close(losses.mola_balance_loss(p0, ids[1]),
          losses.mola_balance_loss(torch.cat(p0), torch.cat(ids[1])), torch.float64)
    close(losses.mola_balance_loss(p0, ids[1]), authors_mola_loss([logits[1]], k), torch.float64)


def loop_llava(probs, ids, mask):
    """per sample: sum_e mean(p_e) * mean(onehot_e) over layers x valid tokens; mean over batch."""
    B, S, E = probs[0].shape
    total = probs[0].sum() * 0
    for b in range(B):
        toks = [(l, s) for l in range(len(probs)) for s in range(S) if mask is None or bool(mask[b, s])]
        n = len(toks)
        if n == 0:
            continue
        for e in range(E):
            pm = sum(probs[l][b, s, e] for l, s in toks) / n
            fm = sum(1 for l, s in toks if int(ids[l][b, s]) == e) / n
            total = total + pm * fm
    return total / B


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_llava_mole_matches_loop(gen, layers, masked):
    B, S, E = 3, 5, 3  # released LLaVA-MoLE config: 3 experts, top-1
    probs = [rand_probs(gen, B, S, E) for _ in range(layers)]
    ids = [p.argmax(-1) for p in probs]
    ids[0][0, 0] = -1  # a token routed nowhere
    mask = pad_mask(gen, B, S) if masked else None
    if layers == 1:
        fn = lambda p: losses.llava_mole_balance_loss(p, ids[0], attention_mask=mask)  # noqa: E731
    else:
        fn = lambda *ps: losses.llava_mole_balance_loss(list(ps), ids, attention_mask=mask)  # noqa: E731
    check_value_and_grad(fn, lambda *ps: loop_llava(ps, ids, mask), probs, torch.float32)


def test_llava_mole_fully_padded_sample_contributes_zero(gen):
    B, S, E = 2, 4, 5
    probs = rand_probs(gen, B, S, E)
    ids = probs.argmax(-1)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1] = False
    out = losses.llava_mole_balance_loss(probs, ids, attention_mask=mask)
    assert torch.isfinite(out)
    close(out, loop_llava([probs], [ids], mask), torch.float64)


# ------------------------------------------------------------------ LoRAMoE LBC

def loop_loramoe(p, tt, delta, mask):
    B, S, E = p.shape
    xs = []
    for b in range(B):
        for e in range(E):
            Q = sum(p[b, s, e] for s in range(S) if mask is None or bool(mask[b, s]))
            expert_type = 1 if e < E // 2 else 0
            xs.append(Q * ((1 + delta) if expert_type == int(tt[b]) else (1 - delta)))
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return var / (mean ** 2 + 1e-10)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("B", [4, 1])
def test_loramoe_lbc_matches_loop(gen, masked, B):
    S, E, delta = 6, 8, 0.1  # LoRAMoE release: 8 experts
    probs = rand_probs(gen, B, S, E)
    tt = torch.randint(0, 2, (B,), generator=gen)
    if B > 1:
        tt[0], tt[1] = 0, 1
    mask = pad_mask(gen, B, S) if masked else None
    check_value_and_grad(lambda p: losses.loramoe_lbc_loss(p, tt, delta, attention_mask=mask),
                         lambda p: loop_loramoe(p, tt, delta, mask), [probs], torch.float32)


def test_loramoe_delta_zero_is_plain_cv_squared(gen):
    probs = rand_probs(gen, 3, 4, 6)
    x = probs.sum(1).flatten()
    close(losses.loramoe_lbc_loss(probs, torch.tensor([1, 0, 1]), delta=0.0),
          x.var() / (x.mean() ** 2 + 1e-10), torch.float64)


# ------------------------------------------------------------------ MoLE / MeteoRA

def test_mole_gate_balance_matches_loop(gen):
    gates = rand_probs(gen, 2, 5, 4)

    def loop(g):
        rows = g.reshape(-1, 4)
        return -sum(torch.log(sum(rows[t, i] for t in range(rows.shape[0])) / rows.shape[0]) for i in range(4))

    check_value_and_grad(losses.mole_gate_balance_loss, loop, [gates], torch.float32)


def loop_meteora(zs, labels, coef, ignore=-100):
    per_module = []
    B, S, E = zs[0].shape
    for z in zs:
        terms = []
        for b in range(B):
            for s in range(S - 1):
                y = int(labels[b, s + 1])
                if y == ignore:
                    continue
                lse = torch.log(sum(torch.exp(z[b, s, e]) for e in range(E)))
                terms.append(lse - z[b, s, y])
        per_module.append(sum(terms) / len(terms))
    return coef * sum(per_module) / len(per_module)


@pytest.mark.parametrize("modules", [1, 3])
def test_meteora_gate_loss_matches_loop(gen, modules):
    B, S, E = 2, 6, 5
    zs = [torch.randn(B, S, E, generator=gen, dtype=torch.float64) * 2 for _ in range(modules)]
    labels = torch.randint(0, E, (B, S), generator=gen)
    labels[0, 2] = labels[1, 4] = -100
    if modules == 1:
        fn = lambda z: losses.meteora_gate_loss(z, labels)  # noqa: E731
    else:
        fn = lambda *z: losses.meteora_gate_loss(list(z), labels)  # noqa: E731
    check_value_and_grad(fn, lambda *z: loop_meteora(z, labels, 50.0), zs, torch.float32)
    # custom coef / ignore_index
    lab2 = labels.masked_fill(labels == -100, 7)
    close(losses.meteora_gate_loss(zs, lab2, coef=1.0, ignore_index=7), loop_meteora(zs, lab2, 1.0, ignore=7),
          torch.float64)


def test_meteora_no_position_is_zero(gen):
    z = leaf(torch.randn(2, 1, 4, generator=gen))  # S = 1: nothing to predict after the shift
    out = losses.meteora_gate_loss(z, torch.randint(0, 4, (2, 1), generator=gen))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


# ------------------------------------------------------------------ MoELoRA contrastive

def loop_supcon(x, ids, tau):
    rows = [(t, j) for t in range(ids.shape[0]) for j in range(ids.shape[1]) if int(ids[t, j]) >= 0]
    zs = [x[t, j] / torch.sqrt((x[t, j] ** 2).sum()) for t, j in rows]
    lab = [int(ids[t, j]) for t, j in rows]
    N = len(rows)
    per_anchor = []
    for i in range(N):
        sims = {a: (zs[i] * zs[a]).sum() / tau for a in range(N) if a != i}
        log_denom = torch.log(sum(torch.exp(v) for v in sims.values()))
        pos = [a for a in sims if lab[a] == lab[i]]
        if pos:
            per_anchor.append(-sum(sims[a] - log_denom for a in pos) / len(pos))
    return sum(per_anchor) / len(per_anchor)


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_moelora_contrastive_matches_loop(gen, tau):
    T, k, d, E = 7, 2, 5, 4  # MoELoRA: top-2
    x = torch.randn(T, k, d, generator=gen, dtype=torch.float64)
    ids = rand_ids(gen, T, E, k, drop=0.2)
    check_value_and_grad(lambda v: losses.moelora_contrastive_loss(v, ids, temperature=tau),
                         lambda v: loop_supcon(v, ids, tau), [x], torch.float32)


def test_moelora_contrastive_without_positives_is_zero(gen):
    x = leaf(torch.randn(3, 2, 4, generator=gen))
    ids = torch.tensor([[0, 1], [2, 3], [4, -1]])  # every expert appears once: no positive pair
    out = losses.moelora_contrastive_loss(x, ids)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    one = losses.moelora_contrastive_loss(x, torch.tensor([[0, -1], [-1, -1], [-1, -1]]))
    assert one.item() == 0.0


# ------------------------------------------------------------------ LoRA-Mixer

@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_lora_mixer_rsl_matches_loop(gen, masked):
    B, S, E, k, coef = 2, 6, 7, 2, 0.2
    probs = rand_probs(gen, B * S, E)
    ids = rand_ids(gen, B * S, E, k)
    mask = pad_mask(gen, B, S) if masked else None
    keep = None if mask is None else mask.reshape(-1)

    def loop(p):
        H = [-sum((v + 1e-5) * torch.log(v + 1e-5) for v in p[t]) for t in range(B * S)]
        return loop_mixtral(p, ids, keep) + coef * loop_masked_token_mean(H, keep)

    check_value_and_grad(lambda p: losses.lora_mixer_rsl_loss(p, ids, entropy_coef=coef, attention_mask=mask),
                         loop, [probs], torch.float32)


# ------------------------------------------------------------------ gradcheck (float64)

def test_gradcheck_float64(gen):
    T, E, k = 5, 7, 2
    p = leaf(rand_probs(gen, T, E))
    w = leaf(rand_probs(gen, T, E) * (torch.rand(T, E, generator=gen, dtype=torch.float64) < 0.6))
    ids = rand_ids(gen, T, E, k)
    mask = torch.tensor([1, 1, 0, 1, 1])
    gc = torch.autograd.gradcheck
    assert gc(lambda a: losses.mixtral_load_balancing_loss(a, ids, attention_mask=mask), (p,))
    assert gc(lambda a, b: losses.dynmole_loss(a, b, 0.5, 0.5, attention_mask=mask), (p, w))
    assert gc(lambda a: losses.tsallis_entropy(a, q=1.0), (p,))
    assert gc(lambda a: losses.router_z_loss(a, attention_mask=mask), (leaf(torch.randn(T, E, dtype=torch.float64)),))
    assert gc(lambda a: losses.loramoe_lbc_loss(a, torch.tensor([1, 0]), 0.2),
              (leaf(rand_probs(gen, 2, 3, 4)),))
    assert gc(losses.mole_gate_balance_loss, (leaf(rand_probs(gen, 6, 3)),))
    assert gc(lambda a: losses.moelora_contrastive_loss(a, ids, 0.3),
              (leaf(torch.randn(T, k, 3, generator=gen, dtype=torch.float64)),))
    labels = torch.randint(0, 4, (2, 4), generator=gen)
    assert gc(lambda a: losses.meteora_gate_loss(a, labels, coef=2.0),
              (leaf(torch.randn(2, 4, 4, generator=gen, dtype=torch.float64)),))


# ------------------------------------------------------------------ aux-loss-free bias update

@pytest.mark.parametrize("rate", [1e-5, 1e-3], ids=["smora", "flylora"])
def test_aux_free_bias_update_exact(gen, rate):
    # counts [5, 3, 4, 4, 0, 8]: sum 24, mean 4 -> sign(mean - c) = [-1, +1, 0, 0, +1, -1]
    counts = [5, 3, 4, 4, 0, 8]
    flat = torch.tensor([e for e, c in enumerate(counts) for _ in range(c)] + [-1] * 5)
    ids = flat[torch.randperm(flat.numel(), generator=gen)]  # shuffled, 5 dropped (-1)
    bias0 = torch.randn(6, generator=gen) * 1e-2
    bias = torch.nn.Parameter(bias0.clone())  # a requires-grad buffer is updated in place, no graph
    out = losses.aux_free_bias_update_(bias, ids, 6, rate)
    assert out is bias and out.grad_fn is None
    expect = [b + rate * (1 if 4 > c else -1 if 4 < c else 0) for b, c in zip(bias0.tolist(), counts)]
    torch.testing.assert_close(bias.detach(), torch.tensor(expect), rtol=0, atol=0)
    assert bias[0] < bias0[0] and bias[5] < bias0[5]  # over-used experts go down
    assert bias[1] > bias0[1] and bias[4] > bias0[4]  # under-used (and unused) go up
    assert bias[2] == bias0[2] and bias[3] == bias0[3]  # exactly average: unchanged


def test_aux_free_bias_update_random_matches_loop(gen):
    R, k, T = 7, 3, 20  # FlyLoRA-style rank ids [T, k] with -1
    ids = rand_ids(gen, T, R, k)
    bias = torch.randn(R, generator=gen, dtype=torch.float64)
    before = bias.clone()
    c = [int((ids == r).sum()) for r in range(R)]
    assert torch.equal(losses.expert_counts(ids, R), torch.tensor(c, dtype=torch.int32))
    mean = sum(c) / R
    losses.aux_free_bias_update_(bias, ids.int(), R, 0.25)
    expect = [b + 0.25 * ((mean > ci) - (mean < ci)) for b, ci in zip(before.tolist(), c)]
    torch.testing.assert_close(bias, torch.tensor(expect, dtype=torch.float64), rtol=0, atol=0)


# ------------------------------------------------------------------ bad inputs

def _bad_cases():
    p = torch.softmax(torch.randn(4, 6), -1)
    ids = torch.randint(0, 6, (4, 2))
    p3 = torch.softmax(torch.randn(2, 3, 6), -1)
    L = losses
    return [
        ("mixtral-int-probs", lambda: L.mixtral_load_balancing_loss(p.long(), ids), TypeError, "probs"),
        ("mixtral-float-ids", lambda: L.mixtral_load_balancing_loss(p, ids.float()), TypeError, "ids"),
        ("mixtral-1d-probs", lambda: L.mixtral_load_balancing_loss(p[0], ids), ValueError, "probs"),
        ("mixtral-rows", lambda: L.mixtral_load_balancing_loss(p, ids[:3]), ValueError, "ids"),
        ("mixtral-E", lambda: L.mixtral_load_balancing_loss(p, ids, num_experts=5), ValueError, "num_experts"),
        ("mixtral-id-range", lambda: L.mixtral_load_balancing_loss(p, ids.clone().fill_(6)), IndexError, "ids"),
        ("mixtral-id-neg", lambda: L.mixtral_load_balancing_loss(p, ids.clone().fill_(-2)), IndexError, "ids"),
        ("mixtral-mask", lambda: L.mixtral_load_balancing_loss(p, ids, attention_mask=torch.ones(3)),
         ValueError, "attention_mask"),
        ("mixtral-not-tensor", lambda: L.mixtral_load_balancing_loss([[0.5, 0.5]], ids), TypeError, "probs"),
        ("mixtral-empty-list", lambda: L.mixtral_load_balancing_loss([], ids), ValueError, "probs"),
        ("switch-k2", lambda: L.switch_load_balancing_loss(p, ids), ValueError, "ids"),
        ("zloss-int", lambda: L.router_z_loss(ids), TypeError, "logits"),
        ("tsallis-q0", lambda: L.tsallis_entropy(p, q=0.0), ValueError, "q"),
        ("tsallis-int", lambda: L.tsallis_entropy(ids), TypeError, "probs"),
        ("dynmole-shape", lambda: L.dynmole_loss(p, p[:, :5]), ValueError, "weights"),
        ("dynmole-rows", lambda: L.dynmole_loss(p, p[:3]), ValueError, "weights"),
        ("mola-list-vs-tensor", lambda: L.mola_balance_loss([p], ids), ValueError, "lists"),
        ("mola-layer-mixed-E", lambda: L.mola_balance_loss([p, p[:, :4]], [ids, ids.clamp_max(3)]),
         ValueError, "share E"),
        ("mola-layers-not-lists", lambda: L.mola_balance_loss([[p], p], [[ids], ids]), ValueError,
         "must be lists"),
        ("mola-per-module-lists", lambda: L.mola_balance_loss_per_module(p, [ids]), ValueError,
         "lists"),
        ("llava-2d", lambda: L.llava_mole_balance_loss(p, ids[:, 0]), ValueError, "probs"),
        ("llava-ids-shape", lambda: L.llava_mole_balance_loss(p3, ids), ValueError, "ids"),
        ("llava-list-mismatch", lambda: L.llava_mole_balance_loss([p3, p3], p3.argmax(-1)), ValueError, "ids"),
        ("llava-mask", lambda: L.llava_mole_balance_loss(p3, p3.argmax(-1), torch.ones(3, 2)),
         ValueError, "attention_mask"),
        ("loramoe-odd-E", lambda: L.loramoe_lbc_loss(p3[..., :5], torch.tensor([0, 1])), ValueError, "even"),
        ("loramoe-tt-float", lambda: L.loramoe_lbc_loss(p3, torch.tensor([0.0, 1.0])), TypeError, "task_types"),
        ("loramoe-tt-value", lambda: L.loramoe_lbc_loss(p3, torch.tensor([0, 2])), ValueError, "task_types"),
        ("loramoe-tt-shape", lambda: L.loramoe_lbc_loss(p3, torch.tensor([0, 1, 1])), ValueError, "task_types"),
        ("mole-int", lambda: L.mole_gate_balance_loss(ids), TypeError, "gates"),
        ("meteora-labels-shape", lambda: L.meteora_gate_loss(p3, torch.zeros(2, 4, dtype=torch.long)),
         ValueError, "task_labels"),
        ("meteora-label-range", lambda: L.meteora_gate_loss(p3, torch.full((2, 3), 6)), IndexError, "task_labels"),
        ("meteora-float-labels", lambda: L.meteora_gate_loss(p3, torch.zeros(2, 3)), TypeError, "task_labels"),
        ("meteora-2d", lambda: L.meteora_gate_loss(p, torch.zeros(4, 6, dtype=torch.long)), ValueError,
         "gate_logits"),
        ("moelora-ids-shape", lambda: L.moelora_contrastive_loss(torch.randn(4, 2, 3), ids[:, :1]), ValueError,
         "ids"),
        ("moelora-tau", lambda: L.moelora_contrastive_loss(torch.randn(4, 2, 3), ids, 0.0), ValueError,
         "temperature"),
        ("bias-shape", lambda: L.aux_free_bias_update_(torch.zeros(5), ids, 6, 1e-3), ValueError, "bias"),
        ("bias-int", lambda: L.aux_free_bias_update_(torch.zeros(6, dtype=torch.long), ids, 6, 1e-3),
         TypeError, "bias"),
        ("bias-float-ids", lambda: L.aux_free_bias_update_(torch.zeros(6), ids.float(), 6, 1e-3), TypeError, "ids"),
        ("counts-range", lambda: L.expert_counts(ids, 3), IndexError, "ids"),
    ]


_BAD = _bad_cases()


@pytest.mark.parametrize("case", range(len(_BAD)), ids=[c[0] for c in _BAD])
def test_bad_inputs(case):
    name, call, exc, arg = _bad_cases()[case]
    with pytest.raises(exc, match=arg) as info:
        call()
    fn = "id_histogram" if name.startswith("counts") else "molora.losses."
    assert fn in str(info.value), str(info.value)  # the message names the function


# ------------------------------------------------------------------ module hygiene

def test_losses_imports_no_sibling_module():
    """losses.py must not depend on the other molora_ops/modules files."""
    src = open(os.path.join(os.path.dirname(losses.__file__), "losses.py")).read()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ImportFrom):
            assert node.level != 1 or node.module is None, f"imports sibling module {node.module}"
            assert not (node.module or "").startswith("molora_ops.modules"), node.module
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("molora_ops.modules") for a in node.names)
    assert set(losses.__all__) >= {
        "mixtral_load_balancing_loss", "switch_load_balancing_loss", "router_z_loss", "tsallis_entropy",
        "dynmole_loss", "mola_balance_loss", "mola_balance_loss_per_module",
        "llava_mole_balance_loss", "loramoe_lbc_loss",
        "mole_gate_balance_loss", "meteora_gate_loss", "moelora_contrastive_loss", "lora_mixer_rsl_loss",
        "aux_free_bias_update_", "expert_counts"}
