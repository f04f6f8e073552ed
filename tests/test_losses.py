"""pipeline.losses against float64 references, special cases from the research notes, properties, gradchecks."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pipeline.loss import divergences as L
from tests import reference as ref

METHOD_CASES = [
    ("fkl", {}), ("rkl", {}), ("tvd", {}), ("gjsd", {"beta": 0.5}), ("gjsd", {"beta": 0.1}), ("gjsd", {"beta": 0.0}),
    ("skl", {"alpha": 0.1}), ("srkl", {"alpha": 0.3}), ("alpha_divergence", {"alpha": 0.5}),
    ("alpha_divergence", {"alpha": -2.0}), ("ab_divergence", {"alpha": 0.2, "beta": 0.7}),
    ("amid", {"alpha": 0.5, "lam": 0.1, "divergence": "ab", "order": "pr"}),
    ("amid", {"alpha": -3.0, "lam": 0.3, "divergence": "kl", "order": "qr"}),
    ("amid", {"alpha": 2.5, "lam": 0.7, "divergence": "kl", "order": "rq"}),
    ("amid", {"alpha": 1.0, "lam": 0.4, "divergence": "kl", "order": "rp"}),
    ("taid", {"t": 0.4}), ("taid", {"t": 0.9}),
    ("atkd", {}), ("atkd", {"lam": 0.5, "hard_fraction": 0.3, "reverse": True}), ("atkd", {"keep_unc": True}),
]


def _case_inputs(V, seed, B=2, T=5, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zt = scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    zs = 0.6 * zt + scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    return zt, zs, targets, mask


def _ours(name, zs, zt, targets, mask, **o):
    return L.distillation_loss(name, zs, zt, mask=mask, targets=targets, **o)


def _grad(fn, zs):
    zs = zs.detach().clone().requires_grad_(True)
    v = fn(zs)
    (g,) = torch.autograd.grad(v.sum(), zs)
    return v.detach(), g


@pytest.mark.parametrize("name,opts", METHOD_CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("V", [11, 3000])
def test_float32_matches_float64_reference(name, opts, V):
    zt, zs, targets, mask = _case_inputs(V, seed=V + len(name))
    v_ref, g_ref = _grad(lambda z: ref.method(name, z, zt, targets=targets, mask=mask, **opts), zs)
    v32, g32 = _grad(lambda z: _ours(name, z, zt.float(), targets, mask, **opts), zs.float())
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), v_ref, rtol=2e-5, atol=2e-6)
    assert (g32.double() - g_ref).norm() <= 1e-4 * g_ref.norm() + 1e-7
    # float64 in, float64 out: the same maths without fp32 rounding agrees to near machine precision
    v64, g64 = _grad(lambda z: _ours(name, z, zt, targets, mask, **opts), zs)
    torch.testing.assert_close(v64, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g64, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,opts", [("fkl", {}), ("gjsd", {"beta": 0.5}), ("amid", {"alpha": -1.5, "lam": 0.1}),
                                       ("amid", {"alpha": 0.9, "lam": 0.2, "divergence": "kl"}), ("taid", {"t": 0.5}),
                                       ("atkd", {})])
def test_large_vocab_50k(name, opts):
    zt, zs, targets, mask = _case_inputs(50_000, seed=7, B=1, T=3)
    v_ref, g_ref = _grad(lambda z: ref.method(name, z, zt, targets=targets, mask=mask, **opts), zs)
    v32, g32 = _grad(lambda z: _ours(name, z, zt.float(), targets, mask, **opts), zs.float())
    torch.testing.assert_close(v32.double(), v_ref, rtol=2e-5, atol=2e-6)
    assert (g32.double() - g_ref).norm() <= 1e-4 * g_ref.norm()


# ----------------------------------------------------------------------------------------------------------------
# The alpha-mixture
# ----------------------------------------------------------------------------------------------------------------
def test_alpha_mixture_matches_definition_random_alpha_lambda():
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        V = [50, 2000, 50_000][i % 3]
        alpha = float(torch.empty(1).uniform_(-3, 3, generator=g))
        lam = float(torch.rand(1, generator=g))
        zt = 2.5 * torch.randn(3, V, generator=g, dtype=torch.float64)
        zs = 2.5 * torch.randn(3, V, generator=g, dtype=torch.float64)
        r_ref = ref.mixture(ref.probs(zt), ref.probs(zs), alpha, lam)
        lr = L.alpha_mixture_log_probs(zt.float(), zs.float(), alpha=alpha, lam=lam)
        assert lr.dtype == torch.float32 and torch.isfinite(lr).all()
        # where r is representable in float32 the log agrees to a relative 1e-5 of its magnitude
        big = r_ref > 1e-30
        torch.testing.assert_close(lr.double()[big], torch.log(r_ref[big]), rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(lr.double().exp().sum(-1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-5)


TOY_T = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]], dtype=torch.float64)
TOY_S = torch.tensor([[0.5, 0.5, -1.0, 1.0, -2.0]], dtype=torch.float64)


@pytest.mark.parametrize("alpha,Z", [(-5, 1.079545707), (-3, 1.040995916), (-1, 1.0), (-0.5, 0.987040734),
                                     (0, 0.971511590), (0.5, 0.952224787), (0.9, 0.933200398),
                                     (1 - 1e-6, 0.927864719), (1, 0.927864665), (3, 0.782818932)])
def test_mixture_normaliser_research_values(alpha, Z):
    lp, lq = L.log_normalize(TOY_T, TOY_S)
    u = L.power_mean_log(lp, lq, alpha=alpha, lam=0.1)
    assert abs(torch.logsumexp(u, -1).exp().item() - Z) < 2e-9


@pytest.mark.parametrize("alpha,row", [
    (-5, [0.402685804, 0.010887913, 0.693921780, 0.011366670, 0.699460401]),
    (-1, [0.437376623, 0.004754776, 0.728030264, 0.004825944, 0.735999633]),
    (0, [0.428540462, 0.005996638, 0.705369539, 0.006018097, 0.716039373]),
    (0.5, [0.417681877, 0.007838609, 0.682237419, 0.007810711, 0.695068759]),
    (1, [0.400716752, 0.011358077, 0.647715685, 0.011219804, 0.663449762]),
    (3, [0.268791946, 0.075828254, 0.390374306, 0.069439174, 0.420733786])])
def test_amid_research_table(alpha, row):
    got = [L.distillation_loss("amid", TOY_S, TOY_T, alpha=alpha, lam=0.1, divergence=d, order=o).item()
           for d, o in [("kl", "pr"), ("kl", "qr"), ("kl", "rp"), ("kl", "rq"), ("ab", "pr")]]
    assert got == pytest.approx(row, abs=2e-9)


def test_amid_research_gradients_and_equivalences():
    def grad(**o):
        zs = TOY_S.clone().requires_grad_(True)
        L.distillation_loss("amid", zs, TOY_T, **o).sum().backward()
        return zs.grad[0].tolist()
    assert grad(alpha=-1, lam=0.1, divergence="kl") == pytest.approx(
        [-0.2918517, -0.0053327, -0.0276111, 0.3119128, 0.0128827], abs=1e-7)
    assert grad(alpha=0, lam=0.1, divergence="kl") == pytest.approx(
        [-0.3073704, 0.0097079, -0.0251333, 0.3096059, 0.0131898], abs=1e-7)
    assert grad(alpha=0.5, lam=0.1, divergence="ab") == pytest.approx(
        [-0.3915498, -0.1049916, -0.0565776, 0.5293255, 0.0237934], abs=1e-7)
    # AMiD(1, t, KL, rq) with the student detached in r is TAID: same value and gradient
    taid_grad = [-0.183812, -0.039833, -0.023350, 0.239423, 0.007572]
    assert grad(alpha=1, lam=0.4, divergence="kl", order="rq", detach_student_in_r=True) == pytest.approx(
        taid_grad, abs=1e-6)
    zs = TOY_S.clone().requires_grad_(True)
    v = L.distillation_loss("taid", zs, TOY_T, t=0.4)
    v.sum().backward()
    assert v.item() == pytest.approx(0.151434589, abs=1e-9)
    assert zs.grad[0].tolist() == pytest.approx(taid_grad, abs=1e-6)
    # skew KL / skew RKL of DistiLLM are AMiD at alpha = -1
    skl = L.distillation_loss("skl", TOY_S, TOY_T, alpha=0.1)
    assert skl.item() == pytest.approx(0.437376623, abs=1e-9)
    srkl = L.distillation_loss("srkl", TOY_S, TOY_T, alpha=0.1)
    amid_srkl = L.distillation_loss("amid", TOY_S, TOY_T, alpha=-1, lam=0.9, divergence="kl", order="qr")
    assert srkl.item() == pytest.approx(0.541592582, abs=1e-9) and amid_srkl.item() == pytest.approx(srkl.item())


def test_mixture_special_cases():
    g = torch.Generator().manual_seed(1)
    zt, zs = torch.randn(4, 300, generator=g), torch.randn(4, 300, generator=g)
    lp, lq = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
    mix = lambda a, lam: L.alpha_mixture_log_probs(zt, zs, alpha=a, lam=lam)  # noqa: E731
    for a in (-3.0, -1.0, 0.0, 1.0, 2.0):
        torch.testing.assert_close(mix(a, 1.0), lp)
        torch.testing.assert_close(mix(a, 0.0), lq)
        torch.testing.assert_close(mix(a, 0.5 + 1e-12 * 0), mix(a, 0.5))
    lam = 0.3
    torch.testing.assert_close(mix(-1.0, lam).exp(), lam * lp.exp() + (1 - lam) * lq.exp())
    torch.testing.assert_close(mix(1.0, lam), torch.log_softmax(lam * lp + (1 - lam) * lq, -1))
    # continuity around alpha = +1 and -1 in float32 (the logaddexp form of the official code fails the first)
    for a0 in (1.0, -1.0):
        for eps in (1e-3, 1e-5, 1e-6):
            for a in (a0 - eps, a0 + eps):
                assert (mix(a, lam) - mix(a0, lam)).abs().max() < 10 * eps + 1e-5


def test_mixture_monotone_in_alpha_and_bounded():
    g = torch.Generator().manual_seed(2)
    lp, lq = L.log_normalize(torch.randn(3, 50, generator=g, dtype=torch.float64),
                             torch.randn(3, 50, generator=g, dtype=torch.float64))
    prev = None
    for a in (-5.0, -3.0, -1.0, 0.0, 0.5, 1.0, 3.0):
        u = L.power_mean_log(lp, lq, alpha=a, lam=0.3)
        assert (u <= torch.maximum(lp, lq) + 1e-12).all() and (u >= torch.minimum(lp, lq) - 1e-12).all()
        if prev is not None:
            assert (u <= prev + 1e-12).all()  # power means fall as the exponent falls (alpha rises)
        prev = u


# ----------------------------------------------------------------------------------------------------------------
# Non-finite inputs: -inf columns and logits near the float32 range limits
# ----------------------------------------------------------------------------------------------------------------
ALL_METHODS = sorted(L.METHODS)


@pytest.mark.parametrize("name", ALL_METHODS)
@pytest.mark.parametrize("alpha", [-3.0, -1.0, 0.5, 1.0, 3.0])
def test_padded_columns_equal_dropped_columns(name, alpha):
    """-inf in both models (padded vocab rows) gives the loss and gradient of the unpadded vocabulary, and a zero
    gradient in the padded columns."""
    zt, zs, targets, mask = _case_inputs(20, seed=3, B=1, T=6)
    zt, zs = zt.float(), zs.float()
    targets = targets.clamp_max(15)
    opts = {"alpha": alpha} if name in ("amid", "alpha_divergence") else {}
    pad = lambda z: torch.cat([z[..., :16], torch.full_like(z[..., 16:], -math.inf)], -1)  # noqa: E731
    v_pad, g_pad = _grad(lambda z: _ours(name, pad(z), pad(zt), targets, mask, **opts), zs)
    v_cut, g_cut = _grad(lambda z: _ours(name, z[..., :16], zt[..., :16], targets, mask, **opts), zs)
    assert torch.isfinite(v_pad).all() and torch.isfinite(g_pad).all()
    torch.testing.assert_close(v_pad, v_cut, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_pad[..., :16], g_cut[..., :16], rtol=1e-5, atol=1e-6)
    assert (g_pad[..., 16:] == 0).all()


@pytest.mark.parametrize("name", ["fkl", "tvd", "gjsd", "skl", "srkl", "amid", "taid", "atkd"])
@pytest.mark.parametrize("alpha", [-3.0, 0.0, 0.99, 2.0])
def test_teacher_only_neg_inf_and_extreme_logits_stay_finite(name, alpha):
    g = torch.Generator().manual_seed(4)
    zt = 3 * torch.randn(2, 4, 64, generator=g)
    zs = 3 * torch.randn(2, 4, 64, generator=g)
    zt[0, :, :5] = -math.inf                # a top-k teacher: some columns have no mass
    zt[1, 0, 3], zs[1, 1, 7] = 1e38, -1e38  # near the float32 limits
    zs[1, 2, 9], zt[1, 3, 1] = 3e37, -3e37
    targets = torch.randint(5, 64, (2, 4), generator=g)
    opts = {"alpha": alpha} if name == "amid" else {}
    if name == "amid":
        # alpha < 1: r covers the union of supports, so D(q || r) is finite; alpha >= 1: r lives on the intersection
        # (r = 0 where the teacher is -inf), so D(q || r) is truly infinite and D(r || q) is the finite one
        opts.update(divergence="kl", order="qr" if alpha < 1 else "rq")
    v, grad = _grad(lambda z: _ours(name, z, zt, targets, None, **opts), zs)
    assert torch.isfinite(v).all() and torch.isfinite(grad).all(), (v, grad)


def test_masked_positions_contribute_nothing():
    zt, zs, targets, mask = _case_inputs(30, seed=5)
    zs_bad = torch.where(mask.unsqueeze(-1), zs, torch.full_like(zs, math.nan))  # garbage at ignored positions
    for name in ALL_METHODS:
        v, grad = _grad(lambda z: _ours(name, z, zt, targets, mask), zs_bad)
        assert torch.isfinite(v).all() and torch.isfinite(grad).all()
        assert (v[~mask] == 0).all() and (grad[~mask] == 0).all()
        none = torch.zeros_like(mask)
        v0, g0 = _grad(lambda z: _ours(name, z, zt, targets, none), zs)
        assert (v0 == 0).all() and (g0 == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# Gradchecks (float64) for every loss
# ----------------------------------------------------------------------------------------------------------------
GRADCHECK_CASES = METHOD_CASES + [("amid", {"alpha": 0.3, "lam": 0.2, "divergence": d, "order": o})
                                  for d in ("kl", "ab", "alpha", "jsd") for o in ("pr", "qr", "rp", "rq")]


@pytest.mark.parametrize("name,opts", GRADCHECK_CASES, ids=lambda x: str(x))
def test_gradcheck(name, opts):
    zt, zs, targets, mask = _case_inputs(7, seed=11, B=1, T=4)
    zs = zs.requires_grad_(True)
    if name == "taid":
        # TAID's gradient is by design not the derivative of its value (the student is detached inside p_t):
        # check it against finite differences of KL(p_t || q(z)) with p_t frozen at the evaluation point.
        t = opts["t"]
        lpt = torch.log_softmax((1 - t) * zs.detach() + t * zt, -1)
        frozen = lambda z: torch.where(mask, (lpt.exp() * (lpt - torch.log_softmax(z, -1))).sum(-1), 0.0)  # noqa: E731
        assert torch.autograd.gradcheck(frozen, (zs,))
        _, g = _grad(lambda z: _ours(name, z, zt, targets, mask, **opts), zs)
        _, g_frozen = _grad(frozen, zs)
        torch.testing.assert_close(g, g_frozen)
        return
    assert torch.autograd.gradcheck(lambda z: _ours(name, z, zt, targets, mask, **opts), (zs,))


@pytest.mark.parametrize("alpha", [-5.0, -3.0, 0.0, 0.5, 1.0, 2.5])
def test_fused_mixture_normalisers_equal_the_chained_ones(alpha):
    """AMiD's fused normalisers (one backward round for lse(z_s) and lse(u)) against autograd through the chained
    ones, float64, every divergence and order, with padded (-inf in both) and one-sided -inf columns."""
    zt, zs, targets, mask = _case_inputs(9, seed=21)
    zt = zt.clone()
    zt[..., -2:] = float("-inf")                    # padded rows: both models
    zs_inf = zs.clone()
    zs_inf[..., -2:] = float("-inf")
    zt[0, 1, 3] = float("-inf")                      # the teacher alone
    zs_inf[1, 2, 4] = float("-inf")                  # the student alone
    for d in ("kl", "ab", "alpha", "jsd"):
        for o in ("pr", "qr", "rp", "rq"):
            def chained(z):
                lp, lq = L.log_normalize(zt, z)
                lr = L.alpha_mixture_from_log_probs(lp, lq, alpha=alpha, lam=0.3)
                return L.amid(lp, lq, alpha=alpha, lam=0.3, divergence=d, order=o, lr=lr)

            def fused(z):
                lp, lq, lr = L.mixture_log_probs(zt, z, alpha=alpha, lam=0.3)
                assert type(lr.grad_fn).__name__ == "_MixtureLogProbsBackward"
                return L.amid(lp, lq, alpha=alpha, lam=0.3, divergence=d, order=o, lr=lr)
            v_ref, g_ref = _grad(chained, zs_inf)
            v, g = _grad(fused, zs_inf)
            live = torch.isfinite(v_ref)  # D(., r) can be +inf where r loses p's support (alpha >= 1)
            torch.testing.assert_close(v[live], v_ref[live], rtol=1e-12, atol=1e-12)
            rows = live.all(-1)
            torch.testing.assert_close(g[rows], g_ref[rows], rtol=1e-10, atol=1e-12)
            assert torch.isfinite(g[rows]).all()


def test_gradcheck_alpha_mixture_both_inputs():
    g = torch.Generator().manual_seed(12)
    zt = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    zs = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    for a in (-2.0, -1.0, 0.3, 1.0, 2.5):
        assert torch.autograd.gradcheck(lambda x, y: L.alpha_mixture_log_probs(x, y, alpha=a, lam=0.35), (zt, zs))


# ----------------------------------------------------------------------------------------------------------------
# Baseline limits and identities
# ----------------------------------------------------------------------------------------------------------------
def test_gjsd_limits_and_symmetry():
    zt, zs, _, _ = _case_inputs(40, seed=6)
    f = lambda **o: L.distillation_loss("gjsd", zs, zt, **o)  # noqa: E731
    torch.testing.assert_close(f(beta=0.0), L.distillation_loss("fkl", zs, zt))
    torch.testing.assert_close(f(beta=1.0), L.distillation_loss("rkl", zs, zt))
    torch.testing.assert_close(f(beta=0.5), L.distillation_loss("gjsd", zt, zs, beta=0.5))
    assert (f(beta=0.5) <= math.log(2) + 1e-12).all()
    torch.testing.assert_close(f(beta=1e-9) / 1e-9, L.distillation_loss("fkl", zs, zt), rtol=1e-4, atol=0)
    torch.testing.assert_close(f(beta=1 - 1e-9) / 1e-9, L.distillation_loss("rkl", zs, zt), rtol=1e-4, atol=0)
    # TRL's 2-class oracle: beta = 1 is KL(student || teacher)
    s, t = torch.tensor([[0.1, 0.9]]).log(), torch.tensor([[0.9, 0.1]]).log()
    expect = 0.1 * math.log(0.1 / 0.9) + 0.9 * math.log(0.9 / 0.1)
    assert L.distillation_loss("gjsd", s, t, beta=1.0).item() == pytest.approx(expect, rel=1e-6)


def test_skew_limits_and_bounds():
    zt, zs, _, _ = _case_inputs(40, seed=8)
    torch.testing.assert_close(L.distillation_loss("skl", zs, zt, alpha=0.0), L.distillation_loss("fkl", zs, zt))
    torch.testing.assert_close(L.distillation_loss("srkl", zs, zt, alpha=0.0), L.distillation_loss("rkl", zs, zt))
    assert L.distillation_loss("skl", zs, zt, alpha=1.0).abs().max() < 1e-12
    for a in (0.1, 0.4):
        for name in ("skl", "srkl"):
            v = L.distillation_loss(name, zs, zt, alpha=a)
            assert (v >= -1e-12).all() and (v <= math.log(1 / a) + 1e-12).all()
    # a logit gap of 200 underflows both probabilities in float32: the log-space mixture stays finite
    zt32 = torch.tensor([[0.0, -200.0, 5.0]])
    zs32 = torch.tensor([[0.0, -200.0, -5.0]])
    for name in ("skl", "srkl", "gjsd"):
        assert torch.isfinite(L.distillation_loss(name, zs32, zt32)).all()


def test_tvd_properties():
    zt, zs, _, _ = _case_inputs(40, seed=9)
    v = L.distillation_loss("tvd", zs, zt)
    torch.testing.assert_close(v, L.distillation_loss("tvd", zt, zs))
    assert ((v >= 0) & (v <= 1)).all()
    disjoint_t = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]])
    disjoint_s = torch.tensor([[-math.inf, -math.inf, 0.0, 0.0]])
    assert L.distillation_loss("tvd", disjoint_s, disjoint_t).item() == pytest.approx(1.0)


def test_amari_and_ab_limits():
    zt, zs, _, _ = _case_inputs(30, seed=10)
    fkl, rkl = L.distillation_loss("fkl", zs, zt), L.distillation_loss("rkl", zs, zt)
    amari = lambda a: L.distillation_loss("alpha_divergence", zs, zt, alpha=a)  # noqa: E731
    torch.testing.assert_close(amari(-1.0), fkl)
    torch.testing.assert_close(amari(1.0), rkl)
    torch.testing.assert_close(amari(-1 + 1e-7), fkl, rtol=1e-6, atol=0)
    torch.testing.assert_close(amari(1 - 1e-7), rkl, rtol=1e-6, atol=0)
    abd = lambda a, b: L.distillation_loss("ab_divergence", zs, zt, alpha=a, beta=b)  # noqa: E731
    torch.testing.assert_close(abd(1.0, 0.0), fkl)
    torch.testing.assert_close(abd(0.0, 1.0), rkl)
    # every special branch is the limit of the general formula
    for a, b in [(0.7, 0.0), (0.0, 0.6), (0.5, -0.5), (0.0, 0.0)]:
        e = 1e-5
        torch.testing.assert_close(abd(a, b), abd(a + e, b + 2 * e), rtol=1e-3, atol=1e-6)
    # Amari alpha is the AB-divergence with alpha + beta = 1 up to the scale convention
    torch.testing.assert_close(amari(0.2), abd(0.4, 0.6))


def test_atkd_decomposition_and_special_cases():
    zt, zs, targets, mask = _case_inputs(25, seed=13, B=2, T=8)
    lp, lq = L.log_normalize(zt, zs)
    tkd, dkd, unc = L.target_decomposition(lp, lq, targets)
    torch.testing.assert_close(tkd + unc * dkd, L.kl(lp, lq), rtol=1e-12, atol=1e-12)
    # reverse setting: the same decomposition of KL(q || p)
    tkd_r, dkd_r, unc_r = L.target_decomposition(lq, lp, targets)
    torch.testing.assert_close(tkd_r + unc_r * dkd_r, L.kl(lq, lp), rtol=1e-12, atol=1e-12)
    fkl = L.distillation_loss("fkl", zs, zt, mask=mask)
    # all tokens hard, lam = 0, UnC weight kept: forward KL exactly (group means = token means when all are hard)
    all_hard = L.distillation_loss("atkd", zs, zt, mask=mask, targets=targets, lam=0.0, hard_fraction=1.0,
                                   keep_unc=True)
    torch.testing.assert_close(all_hard, fkl)
    dflt = L.distillation_loss("atkd", zs, zt, mask=mask, targets=targets, lam=0.0, hard_fraction=1.0)
    torch.testing.assert_close(dflt, torch.where(mask, tkd + dkd, 0.0))
    # all easy, lam = 1: DKD; an empty group contributes 0 (no NaN)
    all_easy = L.distillation_loss("atkd", zs, zt, mask=mask, targets=targets, lam=1.0, hard_fraction=0.0)
    torch.testing.assert_close(all_easy, torch.where(mask, dkd, 0.0))
    # one-hot teacher on the target and a student sure of the target: finite everywhere
    zt1 = zt.clone()
    zt1.scatter_(-1, targets.unsqueeze(-1), 1e4)
    zs1 = zs.clone()
    zs1.scatter_(-1, targets.unsqueeze(-1), 200.0)
    for a, b in ((zs, zt1), (zs1, zt), (zs1, zt1)):
        v, grad = _grad(lambda z: L.distillation_loss("atkd", z, b.float(), mask=mask, targets=targets), a.float())
        assert torch.isfinite(v).all() and torch.isfinite(grad).all()
    # q = p gives 0
    assert L.distillation_loss("atkd", zt, zt, mask=mask, targets=targets).abs().max() < 1e-12


def test_atkd_split_is_top_fraction_per_sequence():
    unc = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.3, 0.7, 0.2, 0.8])
    valid = torch.tensor([True, True, True, True, True, True, False, True])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    hard = L.hard_token_mask(unc, valid, groups, 0.5)
    # group 0: 4 valid -> top 2 (0.9, then the first 0.5 by position); group 1: 3 valid -> ceil(1.5) = 2
    assert hard.tolist() == [False, True, True, False, False, True, False, True]


def test_atkd_group_normalisation():
    zt, zs, targets, _ = _case_inputs(20, seed=14, B=1, T=6)
    mask = torch.ones(1, 6, dtype=torch.bool)
    base = L.distillation_loss("atkd", zs, zt, mask=mask, targets=targets)
    lp, _ = L.log_normalize(zt, zs)
    unc = 1 - lp.exp().gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    easy = unc[0] <= unc[0].kthvalue(3).values  # the 3 of 6 tokens that the 50% split calls easy
    idx = torch.cat([torch.arange(6), torch.nonzero(easy).squeeze(-1)])  # duplicate every easy token at the end
    dup = lambda z: z[:, idx]  # noqa: E731
    mean = lambda v: v.sum() / v.numel()  # noqa: E731
    # per-group means: duplicating easy tokens (they stay easy) does not change the loss
    dup_v = L.distillation_loss("atkd", dup(zs), dup(zt), mask=dup(mask), targets=dup(targets), hard_fraction=0.5 * 6 / idx.numel())
    assert mean(dup_v).item() == pytest.approx(mean(base).item(), rel=1e-10)
    tm = L.distillation_loss("atkd", zs, zt, mask=mask, targets=targets, normalize="token_mean")
    tm_dup = L.distillation_loss("atkd", dup(zs), dup(zt), mask=dup(mask), targets=dup(targets),
                                 normalize="token_mean", hard_fraction=0.5 * 6 / idx.numel())
    assert mean(tm_dup).item() != pytest.approx(mean(tm).item(), rel=1e-6)


def test_taid_special_cases():
    zt, zs, _, mask = _case_inputs(30, seed=15)
    fkl = L.distillation_loss("fkl", zs, zt, mask=mask)
    torch.testing.assert_close(L.distillation_loss("taid", zs, zt, mask=mask, t=1.0), fkl)
    _, g1 = _grad(lambda z: L.distillation_loss("taid", z, zt, mask=mask, t=1.0), zs)
    _, gf = _grad(lambda z: L.distillation_loss("fkl", z, zt, mask=mask), zs)
    torch.testing.assert_close(g1, gf)
    v0, g0 = _grad(lambda z: L.distillation_loss("taid", z, zt, mask=mask, t=0.0), zs)
    assert v0.abs().max() < 1e-12 and g0.abs().max() < 1e-12
    # analytic gradient q - p_t proves the student is detached inside p_t
    t = 0.35
    _, gt = _grad(lambda z: L.distillation_loss("taid", z, zt, mask=mask, t=t), zs)
    pt = torch.softmax((1 - t) * zs + t * zt, -1)
    torch.testing.assert_close(gt, torch.where(mask.unsqueeze(-1), torch.softmax(zs, -1) - pt, 0.0))
    # CE form = KL form + H(p_t), same gradient
    ce = L.distillation_loss("taid", zs, zt, mask=mask, t=t, form="ce")
    ent = -(pt * pt.log()).sum(-1)
    torch.testing.assert_close(ce, torch.where(mask, L.distillation_loss("taid", zs, zt, t=t) + ent, 0.0))


def test_temperature_divides_both_logits():
    zt, zs, _, _ = _case_inputs(30, seed=16)
    for name in ("fkl", "amid", "gjsd"):
        torch.testing.assert_close(L.distillation_loss(name, zs, zt, temperature=2.0),
                                   L.distillation_loss(name, zs / 2, zt / 2))


# ----------------------------------------------------------------------------------------------------------------
# TAID schedule
# ----------------------------------------------------------------------------------------------------------------
def _run_schedule(losses, **kw):
    s = L.TaidSchedule(**kw)
    ts = []
    for loss in losses:
        ts.append(s.update(loss))
    return s, ts


def test_taid_schedule_regression_values():
    s, ts = _run_schedule([1.0] * 501, total_steps=1000)
    assert ts[0] == pytest.approx(0.4)        # the first call (global step 0) only records the loss
    assert ts[1] == pytest.approx(0.4006)     # the ramp dominates at N = 1000: 0.4 + 0.6 n / N
    assert ts[100] == pytest.approx(0.46) and ts[500] == pytest.approx(0.70)
    s, ts = _run_schedule([1.0] * 10_001, total_steps=100_000)
    assert ts[1000] == pytest.approx(0.53273, abs=2e-5)   # the adaptive term dominates at N = 1e5
    assert ts[10_000] == pytest.approx(0.95076, abs=2e-5)


def test_taid_schedule_monotone_bounded_and_adaptive_direction():
    g = torch.Generator().manual_seed(17)
    noisy = (1 + 0.5 * torch.rand(300, generator=g)).tolist()
    for seq in (noisy, [1 + i / 100 for i in range(300)], [3 - i / 200 for i in range(300)]):
        s, ts = _run_schedule(seq, total_steps=300)
        ramp = [0.4 + 0.6 * i / 300 for i in range(300)]
        assert all(b >= a for a, b in zip(ts, ts[1:]))
        assert all(t >= r - 1e-12 for t, r in zip(ts[1:], ramp[1:])) and max(ts) <= 1.0
    n = 2000
    ends = [_run_schedule(seq, total_steps=100_000)[1][-1] for seq in
            ([3 - i / n for i in range(n)], [1.0] * n, [1 + i / n for i in range(n)])]
    assert ends[0] > ends[1] > ends[2]
    _, ts = _run_schedule([1.0] * 50, total_steps=50, adaptive=False)
    assert ts == pytest.approx([0.4 + 0.6 * i / 50 for i in range(50)])


def test_taid_schedule_state_round_trip():
    s, _ = _run_schedule([2.0, 1.5, 1.4, 1.45], total_steps=100)
    s2 = L.TaidSchedule(total_steps=100)
    s2.load_state_dict(s.state_dict())
    assert [s.update(1.3), s.update(1.2)] == [s2.update(1.3), s2.update(1.2)]
    with pytest.raises(ValueError, match="t_start"):
        L.TaidSchedule(total_steps=10, t_start=1.0)


# ----------------------------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ----------------------------------------------------------------------------------------------------------------
PROPERTY_METHODS = [("fkl", {}), ("rkl", {}), ("tvd", {}), ("gjsd", {}), ("skl", {}), ("srkl", {}),
                    ("alpha_divergence", {}), ("ab_divergence", {}), ("taid", {"t": 0.6}),
                    ("amid", {"divergence": "kl"}), ("amid", {"alpha": -2.0}), ("amid", {"alpha": 2.0, "order": "qr"}),
                    ("atkd", {})]

logit_rows = st.lists(st.floats(-20, 20, allow_nan=False, width=64), min_size=2, max_size=12)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), case=st.sampled_from(PROPERTY_METHODS))
def test_properties_nonnegative_zero_iff_equal_shift_invariant(data, case):
    name, opts = case
    zt_list = data.draw(logit_rows)
    V = len(zt_list)
    zs_list = data.draw(st.lists(st.floats(-20, 20, allow_nan=False, width=64), min_size=V, max_size=V))
    shift_t, shift_s = data.draw(st.floats(-1e3, 1e3)), data.draw(st.floats(-1e3, 1e3))
    zt = torch.tensor([zt_list], dtype=torch.float64)
    zs = torch.tensor([zs_list], dtype=torch.float64)
    targets = torch.tensor([data.draw(st.integers(0, V - 1))])
    f = lambda s, t: L.distillation_loss(name, s, t, targets=targets, **opts)  # noqa: E731
    v = f(zs, zt)
    assert v.item() >= -1e-9
    assert f(zs + shift_s, zt + shift_t).item() == pytest.approx(v.item(), rel=1e-6, abs=1e-8)
    assert abs(f(zt + shift_s, zt).item()) <= 1e-9  # the student equal to the teacher
    p, q = torch.softmax(zt, -1), torch.softmax(zs, -1)
    if (p - q).abs().max() > 1e-3:
        assert v.item() > 0


# ----------------------------------------------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,opts,field", [
    ("amid", {"lam": 1.5}, "lam"), ("amid", {"alpha": math.inf}, "alpha"), ("amid", {"order": "pq"}, "order"),
    ("amid", {"divergence": "hellinger"}, "divergence"), ("gjsd", {"beta": -0.1}, "beta"),
    ("skl", {"alpha": 2}, "alpha"), ("atkd", {"scope": "global"}, "scope"), ("taid", {"form": "x"}, "form"),
    ("fkl", {"temperature": 0}, "temperature"), ("fkl", {"beta": 0.5}, "beta"), ("nope", {}, "nope"),
])
def test_bad_options_name_the_field(method, opts, field):
    with pytest.raises(ValueError, match=field):
        L.make_loss(method, **opts)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="share a vocabulary"):
        L.distillation_loss("fkl", torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="targets"):
        L.distillation_loss("atkd", torch.zeros(2, 5), torch.zeros(2, 5))


def test_bf16_inputs_compute_in_float32():
    zt, zs, targets, mask = _case_inputs(100, seed=18)
    for name in ALL_METHODS:
        v = L.distillation_loss(name, zs.bfloat16(), zt.bfloat16(), mask=mask, targets=targets)
        assert v.dtype == torch.float32
        ref_v = L.distillation_loss(name, zs.bfloat16().double(), zt.bfloat16().double(), mask=mask, targets=targets)
        torch.testing.assert_close(v.double(), ref_v, rtol=1e-4, atol=1e-5)


def test_scheduled_value():
    assert L.scheduled_value(0.1, 0.5, 0, 10) == 0.1
    assert L.scheduled_value(0.1, 0.5, 5, 10) == pytest.approx(0.3)
    assert L.scheduled_value(0.1, 0.5, 20, 10, "cosine") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule"):
        L.scheduled_value(0.1, 0.5, 1, 10, "exp")
