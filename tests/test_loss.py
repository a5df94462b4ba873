"""Tests for loss.py.  Expected numbers are worked out by hand in plain Python."""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import loss  # noqa: E402
from loss import agg_denom, kl_estimate, masked_mean, opd_advantages, policy_loss  # noqa: E402

F64 = torch.float64
NAN = float("nan")
INF = float("inf")


def t(x, dtype=F64, **kw):
    return torch.tensor(x, dtype=dtype, **kw)


def close(actual, expected, tol=1e-12):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), t(expected), rtol=0, atol=tol)


# --------------------------------------------------------------------------- #
# masked_mean / kl_estimate
# --------------------------------------------------------------------------- #


def test_masked_mean_ignores_garbage_and_handles_empty_rows():
    x = t([[1.0, 3.0, NAN], [INF, 5.0, 7.0], [NAN, NAN, NAN]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]], dtype=torch.bool)
    close(masked_mean(x, mask), (1 + 3 + 5 + 7) / 4)
    close(masked_mean(x, mask, dim=-1), [2.0, 6.0, 0.0])


# d = logp - ref = [0.5, -1.0]
KL_LOGP = [[-1.0, -2.0]]
KL_REF = [[-1.5, -1.0]]


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("k1", [0.5, -1.0]),
        ("k2", [0.125, 0.5]),
        ("k3", [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]),
        ("abs", [0.5, 1.0]),
    ],
)
def test_kl_estimate_kinds(kind, expected):
    close(kl_estimate(t(KL_LOGP), t(KL_REF), kind), [expected])


def test_kl_estimate_default_is_k1_and_zero_when_equal():
    close(kl_estimate(t(KL_LOGP), t(KL_REF)), [[0.5, -1.0]])
    for kind in ("k1", "k2", "k3", "abs"):
        close(kl_estimate(t(KL_LOGP), t(KL_LOGP), kind), [[0.0, 0.0]])


def test_kl_estimate_unknown_kind_names_valid_kinds():
    with pytest.raises(ValueError, match="k1.*k2.*k3.*abs"):
        kl_estimate(t(KL_LOGP), t(KL_REF), "k4")


# --------------------------------------------------------------------------- #
# opd_advantages
# --------------------------------------------------------------------------- #
# Student log-prob is -1 everywhere.  Two teachers, coefs A = 1.0, B = 0.5.
#   row 0: routed to A only        A: d = [-0.5, 1.0]           token 1 masked
#   row 1: routed to B only        B: d = [1.0, 0.0]
#   row 2: routed to both          A: d = [0.5, 0.0]  B: d = [-0.25, 0.25]
#   row 3: routed to none          teacher rows hold garbage (inf / nan / 0)
# Unrouted teacher rows are nan or inf on purpose: they must not leak.


def _opd_inputs():
    student = t([[-1.0, -1.0]] * 4, requires_grad=True)
    teacher_logps = {
        "A": t([[-0.5, -2.0], [NAN, NAN], [-1.5, -1.0], [INF, -INF]]),
        "B": t([[NAN, INF], [-2.0, -1.0], [-0.75, -1.25], [0.0, 0.0]]),
    }
    coefs = {"A": 1.0, "B": 0.5}
    routed = {
        "A": torch.tensor([True, False, True, False]),
        "B": torch.tensor([False, True, True, False]),
    }
    mask = torch.tensor([[1, 0], [1, 1], [1, 1], [1, 1]], dtype=torch.bool)
    return student, teacher_logps, coefs, routed, mask


def test_opd_advantages_pure_k1():
    student, teachers, coefs, routed, mask = _opd_inputs()
    adv = opd_advantages(student, teachers, coefs, routed, mask)
    expected = [
        [0.5, 0.0],  # -1.0 * -0.5; second token masked (would be -1.0)
        [-0.5 * 1.0, -0.5 * 0.0],  # B only
        [-(1.0 * 0.5 + 0.5 * -0.25), -(1.0 * 0.0 + 0.5 * 0.25)],  # both teachers
        [0.0, 0.0],  # routed to none -> zero advantage
    ]
    close(adv, expected)
    assert torch.isfinite(adv).all()
    assert not adv.requires_grad


def test_opd_advantages_k2_weights_each_teacher():
    student, teachers, coefs, routed, mask = _opd_inputs()
    adv = opd_advantages(student, teachers, coefs, routed, mask, kind="k2")
    expected = [
        [-(0.5**2 / 2), 0.0],
        [-0.5 * (1.0**2 / 2), 0.0],
        [-(0.5**2 / 2 + 0.5 * 0.25**2 / 2), -(0.0 + 0.5 * 0.25**2 / 2)],
        [0.0, 0.0],
    ]
    close(adv, expected)


def test_opd_advantages_float_mask_matches_bool_mask():
    student, teachers, coefs, routed, mask = _opd_inputs()
    a = opd_advantages(student, teachers, coefs, routed, mask)
    b = opd_advantages(student, teachers, coefs, routed, mask.to(F64))
    close(a, b.tolist())


@pytest.mark.parametrize("per_token", [False, True])
def test_opd_advantages_mixed_with_rl_adv(per_token):
    student, teachers, coefs, routed, mask = _opd_inputs()
    rl = t([1.0, 2.0, 3.0, 4.0])
    if per_token:
        rl = rl.unsqueeze(-1).expand(4, 2).clone()
    adv = opd_advantages(student, teachers, coefs, routed, mask, rl_adv=rl)
    expected = [
        [1.0 + 0.5, 0.0],  # masked token stays 0 even with rl_adv
        [2.0 - 0.5, 2.0],
        [3.0 - 0.375, 3.0 - 0.125],
        [4.0, 4.0],  # unrouted sample keeps rl_adv only
    ]
    close(adv, expected)


def test_opd_advantages_coef_scales_result():
    student, teachers, coefs, routed, mask = _opd_inputs()
    coefs = {"A": 2.0, "B": 0.0}
    adv = opd_advantages(student, teachers, coefs, routed, mask)
    close(adv, [[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])


def test_opd_advantages_unknown_kind_raises():
    student, teachers, coefs, routed, mask = _opd_inputs()
    with pytest.raises(ValueError):
        opd_advantages(student, teachers, coefs, routed, mask, kind="bogus")


# --------------------------------------------------------------------------- #
# policy_loss
# --------------------------------------------------------------------------- #
# old_logp = 0, so ratio = exp(logp).  clip = 0.2 -> bounds [0.8, 1.2].
#   row 0: ratio [1.1, 1.5, 0.5], adv [ 2,  1, 1]
#          -> objective [2.2 (in range), 1.2 (clipped, adv>0), 0.5 (low ratio, adv>0: not clipped)]
#   row 1: ratio [0.5, 1.5, 3.0], adv [-1, -1, 5], last token masked
#          -> objective [-0.8 (clipped, adv<0), -1.5 (high ratio, adv<0: not clipped)]
#   row 2: no response tokens (ratio 2, garbage-ish) -> ignored everywhere
# Per-token losses on valid tokens: row0 [-2.2, -1.2, -0.5], row1 [0.8, 1.5]

RATIOS = [[1.1, 1.5, 0.5], [0.5, 1.5, 3.0], [2.0, 2.0, 2.0]]
ADV = [[2.0, 1.0, 1.0], [-1.0, -1.0, 5.0], [1.0, 1.0, 1.0]]
MASK = [[1, 1, 1], [1, 1, 0], [0, 0, 0]]


def _pl_inputs(ratios=RATIOS, adv=ADV, mask=MASK):
    logp = t([[math.log(r) for r in row] for row in ratios], requires_grad=True)
    old = torch.zeros_like(logp)
    return logp, old, t(adv), torch.tensor(mask, dtype=torch.bool)


@pytest.mark.parametrize(
    "agg, expected",
    [
        ("token-mean", (-2.2 - 1.2 - 0.5 + 0.8 + 1.5) / 5),
        ("seq-mean-token-mean", ((-2.2 - 1.2 - 0.5) / 3 + (0.8 + 1.5) / 2) / 2),
        ("seq-mean-token-sum", ((-2.2 - 1.2 - 0.5) + (0.8 + 1.5)) / 2),
    ],
)
def test_policy_loss_token_level_aggs(agg, expected):
    logp, old, adv, mask = _pl_inputs()
    loss, m = policy_loss(logp, old, adv, mask, clip=0.2, agg=agg)
    close(loss, expected)
    close(m["clip_frac"], 2 / 5)
    close(m["is_ratio_mean"], (1.1 + 1.5 + 0.5 + 0.5 + 1.5) / 5)
    close(m["loss"], expected)
    assert not m["loss"].requires_grad


def test_policy_loss_float_mask_matches_bool_mask():
    logp, old, adv, mask = _pl_inputs()
    a, _ = policy_loss(logp, old, adv, mask)
    b, _ = policy_loss(logp, old, adv, mask.to(F64))
    close(a, b.item())


def test_policy_loss_no_clip_is_plain_importance_sampling():
    logp, old, adv, mask = _pl_inputs()
    loss, m = policy_loss(logp, old, adv, mask, clip=None)
    # -ratio * adv on valid tokens: [-2.2, -1.5, -0.5, 0.5, 1.5]
    close(loss, (-2.2 - 1.5 - 0.5 + 0.5 + 1.5) / 5)
    close(m["clip_frac"], 0.0)


def test_policy_loss_asymmetric_clip():
    logp, old, adv, mask = _pl_inputs()
    # bounds [0.8, 1.6]: ratio 1.5 with adv>0 is no longer clipped; ratio 0.5
    # with adv<0 still is.  Losses: [-2.2, -1.5, -0.5, 0.8, 1.5]
    loss, m = policy_loss(logp, old, adv, mask, clip=(0.2, 0.6))
    close(loss, (-2.2 - 1.5 - 0.5 + 0.8 + 1.5) / 5)
    close(m["clip_frac"], 1 / 5)
    # bounds [0.4, 1.2]: ratio 0.5 with adv<0 is no longer clipped; 1.5 with
    # adv>0 still is.  Losses: [-2.2, -1.2, -0.5, 0.5, 1.5]
    loss, m = policy_loss(logp, old, adv, mask, clip=(0.6, 0.2))
    close(loss, (-2.2 - 1.2 - 0.5 + 0.5 + 1.5) / 5)
    close(m["clip_frac"], 1 / 5)


def test_policy_loss_asymmetric_clip_uses_low_for_low_side():
    # The batch above is symmetric (1.5 vs 0.5, |adv| = 1), so swapping low and
    # high would go unnoticed there.  Here: ratio [1.5, 0.6], adv [1, -2],
    # clip (0.1, 0.3) -> bounds [0.9, 1.3]:
    #   token 0: min(1.5, 1.3) * 1 = 1.3           -> loss -1.3 (clipped)
    #   token 1: min(0.6 * -2, 0.9 * -2) = -1.8    -> loss  1.8 (clipped)
    # (Swapped bounds [0.7, 1.1] would give (-1.1 + 1.4) / 2 = 0.15.)
    logp, old, adv, mask = _pl_inputs([[1.5, 0.6]], [[1.0, -2.0]], [[1, 1]])
    loss, m = policy_loss(logp, old, adv, mask, clip=(0.1, 0.3))
    close(loss, (-1.3 + 1.8) / 2)
    close(m["clip_frac"], 1.0)


def test_policy_loss_seq_level():
    # log-ratios: row 0 [0.1, 0.3, -0.1] -> mean 0.1; row 1 [0.5, 0.7, (99 masked)]
    # -> mean 0.6; row 2 empty with huge garbage log-ratios.
    logp = t([[0.1, 0.3, -0.1], [0.5, 0.7, 99.0], [50.0, 50.0, 50.0]], requires_grad=True)
    old = torch.zeros_like(logp)
    adv = t([[1.0, -1.0, 2.0], [1.0, -2.0, 3.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor(MASK, dtype=torch.bool)
    r0, r1 = math.exp(0.1), math.exp(0.6)  # r0 in [0.8, 1.2]; r1 above 1.2
    # row 0 unclipped: -r0 * adv.  row 1: adv 1 -> clipped to 1.2; adv -2 -> -2 * r1 (not clipped)
    row0 = [-r0 * 1.0, r0 * 1.0, -r0 * 2.0]
    row1 = [-1.2, 2.0 * r1]
    expected = {
        "token-mean": (sum(row0) + sum(row1)) / 5,
        "seq-mean-token-mean": (sum(row0) / 3 + sum(row1) / 2) / 2,
        "seq-mean-token-sum": (sum(row0) + sum(row1)) / 2,
    }
    for agg, value in expected.items():
        loss, m = policy_loss(logp, old, adv, mask, clip=0.2, level="seq", agg=agg)
        close(loss, value)
        close(m["clip_frac"], 1 / 5)
        close(m["is_ratio_mean"], (3 * r0 + 2 * r1) / 5)
    # Same inputs at token level give a different answer.
    token_loss, _ = policy_loss(logp, old, adv, mask, clip=0.2, level="token")
    assert abs(token_loss.item() - expected["token-mean"]) > 1e-3

    loss, _ = policy_loss(logp, old, adv, mask, clip=0.2, level="seq")
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    close(logp.grad[2], [0.0, 0.0, 0.0])


def test_policy_loss_seq_level_gradient():
    # One sequence, logp = [0.2, -0.1, 0.5], old = 0 -> ratio r = exp(0.2), no clipping.
    # loss = -(r * sum(adv)) / 3 (token-mean), r = exp(mean(logp)) so
    # d loss / d logp_t = -r * sum(adv) / 3 * (1/3) for every token.
    logp = t([[0.2, -0.1, 0.5]], requires_grad=True)
    adv = t([[1.0, 2.0, -0.5]])
    loss, _ = policy_loss(logp, torch.zeros_like(logp), adv, torch.ones(1, 3), clip=None, level="seq")
    loss.backward()
    g = -math.exp(0.2) * 2.5 / 9
    close(logp.grad, [[g, g, g]])


def test_policy_loss_token_gradient_and_no_grad_to_old_logp_or_adv():
    # logp = [0.1, -0.2, ln 1.5, 7 (masked)], old = 0, clip 0.2, token-mean over 3 tokens:
    #   token 0: ratio e^0.1 in range, adv 2  -> d/dlogp = -2 e^0.1 / 3
    #   token 1: ratio e^-0.2 (0.8187) in range, adv -1 -> +e^-0.2 / 3
    #   token 2: ratio 1.5 clipped with adv 1 -> 0
    #   token 3: masked -> 0
    logp = t([[0.1, -0.2, math.log(1.5), 7.0]], requires_grad=True)
    old = t([[0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    adv = t([[2.0, -1.0, 1.0, 1.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = policy_loss(logp, old, adv, mask, clip=0.2)
    loss.backward()
    close(logp.grad, [[-2 * math.exp(0.1) / 3, math.exp(-0.2) / 3, 0.0, 0.0]])
    assert old.grad is None
    assert adv.grad is None
    close(m["clip_frac"], 1 / 3)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("level", ["token", "seq"])
def test_policy_loss_empty_batch_is_zero_with_grad_path(agg, level):
    logp = t([[0.3, NAN], [INF, 1.0]], requires_grad=True)
    mask = torch.zeros(2, 2, dtype=torch.bool)
    old, adv = torch.zeros(2, 2, dtype=F64), torch.ones(2, 2, dtype=F64)
    loss, m = policy_loss(logp, old, adv, mask, level=level, agg=agg)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    close(logp.grad, [[0.0, 0.0], [0.0, 0.0]])
    close(m["clip_frac"], 0.0)


def test_agg_denom():
    mask = torch.tensor(MASK)
    assert agg_denom(mask, "token-mean").item() == 5
    assert agg_denom(mask, "seq-mean-token-mean").item() == 2
    assert agg_denom(mask, "seq-mean-token-sum").item() == 2
    with pytest.raises(ValueError):
        agg_denom(mask, "sum")


# Four rows split into halves [0:2] and [2:4]; the halves differ in token
# count (5 vs 2) and non-empty sequences (2 vs 1), so naive per-half means
# would not reproduce the global loss.
SPLIT_RATIOS = RATIOS + [[0.9, 1.3, 1.0]]
SPLIT_ADV = ADV + [[3.0, 0.5, 1.0]]
SPLIT_MASK = MASK + [[1, 1, 0]]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("level", ["token", "seq"])
def test_denom_override_reproduces_global_aggregation(agg, level):
    logp, old, adv, mask = _pl_inputs(SPLIT_RATIOS, SPLIT_ADV, SPLIT_MASK)
    full, _ = policy_loss(logp, old, adv, mask, level=level, agg=agg)
    full.backward()
    full_grad = logp.grad.clone()
    logp.grad = None

    # Global denom = sum of per-half denoms (what an all-reduce would give).
    halves = [slice(0, 2), slice(2, 4)]
    denom = sum(agg_denom(mask[s], agg) for s in halves)
    assert denom.item() == agg_denom(mask, agg).item()

    total = 0.0
    for s in halves:
        part, _ = policy_loss(logp[s], old[s], adv[s], mask[s], level=level, agg=agg, denom=denom)
        part.backward()  # gradient accumulation across micro-batches
        total = total + part
    close(total, full.item())
    close(logp.grad, full_grad.tolist())

    # Without the global denom each half divides by its own count: wrong answer.
    naive = sum(policy_loss(logp[s], old[s], adv[s], mask[s], level=level, agg=agg)[0] for s in halves)
    assert abs(naive.item() - full.item()) > 1e-3


def test_denom_accepts_python_float():
    logp, old, adv, mask = _pl_inputs()
    loss, _ = policy_loss(logp, old, adv, mask, denom=10.0)
    close(loss, (-2.2 - 1.2 - 0.5 + 0.8 + 1.5) / 10)


def test_unknown_level_or_agg_raises():
    logp, old, adv, mask = _pl_inputs()
    with pytest.raises(ValueError, match="token"):
        policy_loss(logp, old, adv, mask, level="sentence")
    with pytest.raises(ValueError, match="token-mean"):
        policy_loss(logp, old, adv, mask, agg="mean")


# ---- rl_advantages


def test_rl_advantages_reinforce_is_the_reward():
    r = torch.tensor([1.0, 0.0, 0.5])
    assert torch.equal(loss.rl_advantages(r, torch.tensor([0, 0, 1]), "reinforce"), r)


def test_rl_advantages_grpo_normalises_within_groups():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 7.0])
    g = torch.tensor([5, 5, 5, 5, 9, 9, 2])  # group 5: one right of four; group 9 all equal; 2 alone
    adv = loss.rl_advantages(r, g, "grpo")
    # group 5: mean 0.25, population std sqrt(0.1875) = 0.4330
    std = math.sqrt(0.1875)
    expected = [0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std, 0.0, 0.0, 0.0]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-4), adv
    with pytest.raises(ValueError, match="grpo or reinforce"):
        loss.rl_advantages(r, g, "ppo")


@pytest.mark.parametrize("agg", loss.AGGS)
def test_sft_loss_is_the_nll_of_the_given_tokens(agg):
    logp = torch.tensor([[-0.5, -1.0, float("nan")], [-2.0, float("-inf"), float("-inf")]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = loss.sft_loss(logp, mask, agg=agg)
    expected = {"token-mean": 3.5 / 3, "seq-mean-token-mean": (0.75 + 2.0) / 2,
                "seq-mean-token-sum": (1.5 + 2.0) / 2}[agg]
    assert out.item() == pytest.approx(expected)
    out.backward()
    assert torch.isfinite(logp.grad).all() and (logp.grad[~mask.bool()] == 0).all()
    assert (logp.grad[mask.bool()] < 0).all()  # descending it raises the tokens' logprob
    # the same divisor contract as policy_loss: halves with denom add up to the whole
    halves = sum(loss.sft_loss(logp[i:i + 1], mask[i:i + 1], agg=agg, denom=agg_denom(mask, agg))
                 for i in range(2))
    assert halves.item() == pytest.approx(expected)


def test_lr_schedule_warmup_then_constant_or_cosine():
    from types import SimpleNamespace

    from student import lr_factor

    cos = SimpleNamespace(warmup_steps=10, lr_scheduler_type="cosine")
    assert [lr_factor(s, cos, 110) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, cos, 110) == pytest.approx(1.0)
    assert lr_factor(60, cos, 110) == pytest.approx(0.55)   # half way: the middle of 1 .. 0.1
    assert lr_factor(110, cos, 110) == pytest.approx(0.1) == lr_factor(500, cos, 110)
    const = SimpleNamespace(warmup_steps=0, lr_scheduler_type="constant")
    assert lr_factor(0, const, 10) == lr_factor(99, const, 10) == 1.0


# ---- distribution-level KL (issue 12): closed forms on a tiny vocabulary, float64

def _logits(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_reverse_kl_full_and_its_gradient_in_closed_form():
    z = _logits(2, 3, 7, seed=0).requires_grad_()
    t = _logits(2, 3, 7, seed=1).log_softmax(-1)
    s = z.log_softmax(-1)
    kl = loss.reverse_kl_full(s, t)
    q, p = s.exp().detach(), t.exp()
    assert torch.allclose(kl, (q * (q.log() - p.log())).sum(-1), atol=1e-14)
    kl.sum().backward()  # d KL / d logits = q * (log q - log p - KL)
    assert torch.allclose(z.grad, q * (q.log() - p.log() - kl.detach()[..., None]), atol=1e-14)


def test_reverse_kl_topk_with_its_rest_bucket():
    s = _logits(2, 3, 9, seed=2).log_softmax(-1)
    t = _logits(2, 3, 9, seed=3).log_softmax(-1)
    full = loss.reverse_kl_full(s, t)
    for k in range(1, 10):
        vals, ids = t.topk(k, -1)
        kl = loss.reverse_kl_topk(s, vals, ids)
        assert (kl >= -1e-12).all() and (kl <= full + 1e-12).all(), k
        q_k, p_k = s.gather(-1, ids).exp(), vals.exp()
        q_rest, p_rest = 1 - q_k.sum(-1), 1 - p_k.sum(-1)
        by_hand = (q_k * (q_k.log() - p_k.log())).sum(-1)
        if k < 9:
            by_hand = by_hand + q_rest * (q_rest.log() - p_rest.log())
        assert torch.allclose(kl, by_hand, atol=1e-10), k
    assert torch.allclose(loss.reverse_kl_topk(s, *t.topk(9, -1)), full, atol=1e-12)  # k = V
    assert (loss.reverse_kl_topk(s, *t.topk(2, -1)) < full - 1e-3).any()  # a real bucket loses detail


def test_distribution_kl_is_zero_with_zero_gradient_when_teacher_is_student():
    z = _logits(2, 4, 11, seed=4).requires_grad_()
    s = z.log_softmax(-1)
    same = s.detach().clone().requires_grad_()  # gradients must not flow into the teacher
    for kl in (loss.reverse_kl_full(s, same), loss.reverse_kl_topk(s, *same.topk(3, -1))):
        z.grad = None
        assert kl.abs().max() < 1e-12
        kl.sum().backward(retain_graph=True)
        assert z.grad.abs().max() < 1e-12 and same.grad is None
