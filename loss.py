"""Losses and advantages for On-Policy Distillation (OPD).

What this file owns (pure tensor functions, no distributed / vLLM / config code):

* ``kl_estimate``    -- per-token estimators of KL(student || teacher) from the
                        log-probs of the *sampled* tokens (k1, k2, k3, abs).
* ``opd_advantages`` -- turns teacher log-probs into a per-token advantage:
                        ``rl_adv - sum_i coef_i * routed_i * KL_i``.  A sample
                        only pays the KL of the teachers that actually scored it.
* ``reverse_kl_full`` / ``reverse_kl_topk`` -- KL(student || teacher) per position
                        from whole distributions: the full vocabulary, or the
                        teacher's top-k plus a rest-of-vocabulary bucket.
* ``rl_advantages``  -- sequence-level RL advantages from external rewards
                        (``reinforce``, ``grpo``) for mixed mode and plain RL.
* ``policy_loss``    -- PPO-style clipped surrogate with token- or
                        sequence-level importance ratios against the behaviour
                        (sampler) policy, plus the usual aggregation modes.
* ``sft_loss``       -- negative log-likelihood of given tokens: the off-policy
                        distillation baseline (SFT on the teacher's samples).
* ``kl_loss``        -- such a per-token KL as a loss term, aggregated like
                        ``policy_loss``.
* ``agg_denom``      -- the divisor ``policy_loss`` uses, so a caller that
                        splits a batch over micro-batches / ranks can all-reduce
                        it and reproduce the global aggregation exactly.

Simplifications compared with production trainers:

* By default (``opd_kl_mode: sampled``) the KL is estimated on the sampled token
  and enters as an advantage; ``reverse_kl_topk`` / ``reverse_kl_full`` with
  ``kl_loss`` make it a differentiable loss term over whole distributions.
* No value function, no GAE, no dual-clip, no entropy bonus, no KL-to-reference
  penalty in the loss.  ``clip=None`` is plain importance sampling.
* Every tensor is ``[B, T]`` over response tokens; ``mask`` marks real tokens.
  Positions outside the mask may hold anything (even inf/nan): they are
  selected away with ``torch.where`` rather than multiplied by zero, because
  ``nan * 0`` is still nan.
"""

import torch

KL_KINDS = ("k1", "k2", "k3", "abs")
LEVELS = ("token", "seq")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def masked_mean(x, mask, dim=None):
    """Mean of ``x`` over positions where ``mask`` is true (0 if there are none)."""
    valid = mask.bool()
    total = torch.where(valid, x, torch.zeros_like(x))
    count = valid.to(x.dtype)
    if dim is None:
        return total.sum() / count.sum().clamp_min(1)
    return total.sum(dim) / count.sum(dim).clamp_min(1)


# --------------------------------------------------------------------------- #
# KL estimators and OPD advantages
# --------------------------------------------------------------------------- #


def kl_estimate(logp, ref_logp, kind="k1"):
    """Per-token estimate of KL(policy || ref) for tokens sampled from the policy.

    With ``d = logp - ref_logp``:
      k1  = d                   unbiased, but single tokens can be negative
      k2  = d**2 / 2            biased, always >= 0
      k3  = exp(-d) + d - 1     unbiased and always >= 0 (Schulman's estimator)
      abs = |d|
    """
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d.square()
    if kind == "k3":
        return torch.exp(-d) + d - 1
    if kind == "abs":
        return d.abs()
    raise ValueError(f"unknown KL kind {kind!r}; valid kinds: {', '.join(KL_KINDS)}")


def opd_advantages(student_logp, teacher_logps, coefs, routed, mask, rl_adv=None, kind="k1"):
    """Per-token OPD advantage, ``[B, T]``, carrying no gradient.

    adv = (rl_adv or 0) - sum_i coefs[i] * routed[i] * KL(student || teacher_i)

    ``teacher_logps[name]`` is ``[B, T]``; ``routed[name]`` is a bool ``[B]``
    saying which samples that teacher scored.  Rows a teacher did not score may
    hold garbage, so they are removed with ``torch.where`` before summing.
    ``rl_adv`` (optional) is ``[B, T]`` or ``[B]`` (one value per sequence).
    """
    # Advantages are targets, never something to differentiate through.
    student_logp = student_logp.detach()
    adv = torch.zeros_like(student_logp)

    for name, teacher_logp in teacher_logps.items():
        kl = kl_estimate(student_logp, teacher_logp.detach().to(student_logp.dtype), kind)
        hit = routed[name].bool().unsqueeze(-1)  # [B, 1], broadcast over tokens
        adv = adv - coefs[name] * torch.where(hit, kl, torch.zeros_like(kl))

    if rl_adv is not None:
        rl_adv = rl_adv.detach().to(adv.dtype)
        if rl_adv.dim() == 1:  # one scalar per sequence (e.g. GRPO) -> every token
            rl_adv = rl_adv.unsqueeze(-1)
        adv = adv + rl_adv

    return torch.where(mask.bool(), adv, torch.zeros_like(adv))


# --------------------------------------------------------------------------- #
# Policy-gradient loss
# --------------------------------------------------------------------------- #


def reverse_kl_full(student_logp, teacher_logp):
    """KL(student || teacher) per position over the whole vocabulary: [B, T, V] x2 -> [B, T].

    ``sum_v q_v (log q_v - log p_v)`` with q = exp(student_logp), p = exp(teacher_logp),
    both log-probabilities normalised over V. Gradients flow into ``student_logp`` only;
    through a log-softmax the gradient per logit is ``q * (log q - log p - KL)``."""
    teacher_logp = teacher_logp.detach()
    return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)


def reverse_kl_topk(student_logp, teacher_topk_logp, teacher_topk_ids):
    """KL(student || teacher) on the partition {the teacher's top-k ids} + {the rest}: [B, T].

    ``student_logp`` [B, T, V]; the teacher's top-k log-probs (normalised over the full
    vocabulary, not over the k) and their ids, [B, T, k]. The rest of the vocabulary is
    one bucket with q_rest = 1 - sum q_k and p_rest = 1 - sum p_k, which keeps this a
    proper divergence: always >= 0, at most the full KL (a coarser partition never
    increases a KL), and equal to it when k = V (the bucket is then empty). Renormalising
    over the k ids instead (a conditional KL) would ignore how much mass the student puts
    elsewhere. Gradients flow into ``student_logp`` only."""
    s_k = student_logp.gather(-1, teacher_topk_ids)
    t_k = teacher_topk_logp.detach()
    head = (s_k.exp() * (s_k - t_k)).sum(-1)
    log_q_rest, log_p_rest = _log1mexp(s_k.logsumexp(-1)), _log1mexp(t_k.logsumexp(-1))
    return head + log_q_rest.exp() * (log_q_rest - log_p_rest)


def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0, accurate at both ends. x is first capped just below 0:
    when the k ids hold all the mass (up to rounding) the bucket's term is ~eps * log eps
    instead of 0 * log 0 (nan in backward)."""
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def rl_advantages(rewards, group, kind="grpo", eps=1e-6):
    """Sequence-level RL advantage [B] from one scalar reward per sample.

    ``reinforce``: the reward itself. ``grpo``: the reward normalised within its group
    (the samples that answer the same prompt, ``group`` [B] holds any ids):
    (r - mean_g) / (std_g + eps), with the population std, so a group of one or a
    group whose rewards are all equal gets advantage 0 rather than nan.
    """
    rewards = rewards.detach().double()
    if kind == "reinforce":
        return rewards.float()
    if kind != "grpo":
        raise ValueError(f"unknown RL advantage estimator {kind!r}; expected grpo or reinforce")
    _, gid = torch.unique(group, return_inverse=True)
    n = torch.zeros(int(gid.max()) + 1, dtype=rewards.dtype, device=rewards.device)
    n = n.index_add(0, gid, torch.ones_like(rewards))
    mean = torch.zeros_like(n).index_add(0, gid, rewards) / n
    var = torch.zeros_like(n).index_add(0, gid, (rewards - mean[gid]) ** 2) / n
    return ((rewards - mean[gid]) / (var.sqrt()[gid] + eps)).float()


def _clip_bounds(clip):
    """``0.2`` -> (0.8, 1.2); ``(low, high)`` -> (1 - low, 1 + high)."""
    if isinstance(clip, (tuple, list)):
        low, high = clip
    else:
        low = high = clip
    return 1.0 - low, 1.0 + high


def _log_ratio(logp, old_logp, valid, level):
    """log(pi / pi_old) per token, or the sequence's mean broadcast to its tokens."""
    # Zero the log-ratio on padding *before* exp: exp(garbage) could be inf, and
    # inf in a discarded branch still turns the backward pass into nan.
    log_ratio = torch.where(valid, logp - old_logp, torch.zeros_like(logp))
    if level == "token":
        return log_ratio
    if level == "seq":
        # Geometric mean of the token ratios (GSPO-style): one ratio per
        # sequence, length-normalised so long answers are not clipped more.
        # Empty sequences get log-ratio 0, i.e. ratio 1.
        seq = masked_mean(log_ratio, valid, dim=-1)
        return seq.unsqueeze(-1).expand_as(log_ratio)
    raise ValueError(f"unknown level {level!r}; valid levels: {', '.join(LEVELS)}")


def agg_denom(mask, agg="token-mean"):
    """Default divisor of ``policy_loss`` for this batch (an int64 0-d tensor).

    token-mean: number of response tokens; seq-*: number of non-empty sequences.
    Sum it over micro-batches and ranks, pass the total as ``denom`` to every
    ``policy_loss`` call, and the summed losses equal the global aggregation.
    """
    valid = mask.bool()
    if agg == "token-mean":
        return valid.sum()
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return valid.any(dim=-1).sum()
    raise ValueError(f"unknown agg {agg!r}; valid aggs: {', '.join(AGGS)}")


def _aggregate(per_token, valid, agg, denom):
    """Reduce a ``[B, T]`` loss to a scalar; ``per_token`` is already 0 on padding."""
    if agg == "token-mean":
        numer = per_token.sum()
    elif agg == "seq-mean-token-mean":
        n_tokens = valid.sum(dim=-1).clamp_min(1).to(per_token.dtype)
        numer = (per_token.sum(dim=-1) / n_tokens).sum()  # empty rows add 0
    elif agg == "seq-mean-token-sum":
        numer = per_token.sum()  # == sum over sequences of each sequence's sum
    else:
        raise ValueError(f"unknown agg {agg!r}; valid aggs: {', '.join(AGGS)}")

    if denom is None:
        denom = agg_denom(valid, agg)
    denom = torch.as_tensor(denom, dtype=per_token.dtype, device=per_token.device)
    # An empty batch has numer == 0 and a count of 0: divide by 1 instead, so the
    # loss is exactly 0 and still has a (zero) gradient path to logp.
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return numer / denom


def policy_loss(logp, old_logp, adv, mask, clip=0.2, level="token", agg="token-mean", denom=None):
    """Clipped importance-sampled policy-gradient loss.

    logp      current policy log-probs of the sampled tokens, ``[B, T]`` (has grad)
    old_logp  behaviour policy's (the sampler's) log-probs, ``[B, T]``
    adv       per-token advantages, ``[B, T]``
    mask      1/True on response tokens
    clip      eps, ``(eps_low, eps_high)``, or None for no clipping
    level     "token": one ratio per token; "seq": one ratio per sequence
    agg       "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum"
    denom     overrides the final divisor (see ``agg_denom``)

    Returns ``(loss, metrics)``; metrics are detached 0-d tensors.
    """
    if agg not in AGGS:  # fail before doing any work
        raise ValueError(f"unknown agg {agg!r}; valid aggs: {', '.join(AGGS)}")
    valid = mask.bool()
    # Only the current policy is trained; the sampler's log-probs and the
    # advantages are constants of the objective.
    old_logp = old_logp.detach()
    adv = adv.detach().to(logp.dtype)

    ratio = torch.exp(_log_ratio(logp, old_logp, valid, level))
    surr = ratio * adv
    if clip is None:
        objective = surr
        clipped = torch.zeros_like(valid)
    else:
        lo, hi = _clip_bounds(clip)
        surr_clipped = ratio.clamp(lo, hi) * adv
        # Pessimistic bound: take the smaller objective.  Where the clamped
        # term is the smaller one its gradient is zero -- that token is clipped.
        objective = torch.minimum(surr, surr_clipped)
        clipped = surr_clipped < surr

    per_token = torch.where(valid, -objective, torch.zeros_like(objective))
    loss = _aggregate(per_token, valid, agg, denom)

    metrics = {
        "loss": loss.detach(),
        "is_ratio_mean": masked_mean(ratio.detach(), valid),
        "clip_frac": masked_mean(clipped.to(logp.dtype), valid),
    }
    return loss, metrics


def sft_loss(logp, mask, agg="token-mean", denom=None):
    """Negative log-likelihood of the response tokens, aggregated like ``policy_loss``.

    Off-policy distillation: the tokens were sampled by the teacher, so there is no
    importance ratio and no advantage; every token is a target."""
    if agg not in AGGS:
        raise ValueError(f"unknown agg {agg!r}; valid aggs: {', '.join(AGGS)}")
    valid = mask.bool()
    per_token = torch.where(valid, -logp, torch.zeros_like(logp))
    return _aggregate(per_token, valid, agg, denom)


def kl_loss(kl, mask, agg="token-mean", denom=None):
    """A per-token KL ``[B, T]`` (with grad; e.g. ``reverse_kl_topk`` weighted by each routed
    teacher's coefficient) aggregated like ``policy_loss``, same ``denom`` contract.

    It is a loss term, not an advantage: its gradient is the exact gradient of the KL at
    every visited position. Those positions were sampled by the behaviour policy (vLLM),
    and the term carries no importance ratio: with one optimizer step per rollout batch
    the sampler is the current policy up to the sync's numerics, as in GKD-style
    on-policy distillation."""
    if agg not in AGGS:
        raise ValueError(f"unknown agg {agg!r}; valid aggs: {', '.join(AGGS)}")
    valid = mask.bool()
    return _aggregate(torch.where(valid, kl, torch.zeros_like(kl)), valid, agg, denom)
