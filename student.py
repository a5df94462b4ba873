"""The student: FSDP2 sharding and the training step.

Owns building the trainable student (fully_shard per block, fp32 master weights with a
compute dtype, AdamW) and one optimizer step over a rollout batch (advantage, importance-
sampled policy loss, gradient accumulation over micro-batches, clipping, skipping a step
with non-finite numbers). Checkpoints (the HF export and the resumable state) are
checkpoint.py's.

Simplified: one optimizer step per rollout batch (so the detached current logp is pi_old),
warm-up then constant or cosine learning rate.
"""

import math

import torch
import torch.distributed as dist

import loading
import rollout
from loss import (agg_denom, kl_loss, opd_advantages, policy_loss, reverse_kl_full, reverse_kl_topk,
                  sft_loss)


def build_student(path, st, device, total_steps):
    """The trainable student from `path`, sharded with FSDP2 over all ranks (ZeRO-3
    style), with its AdamW optimizer and learning-rate schedule. `st` is the
    student_train config."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    # Parameters are all-gathered in `dtype` for compute; gradients reduce-scatter in fp32.
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, st.dtype), reduce_dtype=torch.float32)

    def shard(model):
        if st.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        # Each block is its own FSDP unit: its parameters are gathered just before it runs
        # and freed right after (reshard_after_forward), then gathered again for backward.
        # Not the last block: its backward starts right after the forward, so freeing it
        # would only buy one more all-gather (as torchtitan does; ~1.3 ms of a tiny 2-rank
        # step over gloo).
        layers = model.model.layers
        for i, block in enumerate(layers):
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
        fully_shard(model, mesh=mesh, mp_policy=mp)  # the root: embeddings, final norm, head

    # fp32 master weights; each rank reads only its own shards from disk (loading.py)
    model = loading.build_sharded(path, dtype=torch.float32, shard=shard, device=device,
                                  attn_implementation=st.attn_implementation)
    if st.gradient_checkpointing:
        # transformers recomputes activations only in training mode (the model comes back in
        # eval mode, like from_pretrained's); dropout then follows the model's config (0 in
        # Qwen3 and Llama: trainer and sampler log-probs stay comparable)
        model.train()
    # fused: one kernel per step over all parameters. The default on CPU is a loop of ~10
    # ops per parameter, each a DTensor dispatch under FSDP2: 3.2 -> 1.4 ms on the tiny
    # peer-benchmark student, 428 -> 268 ms (with grad clipping) on an 8-layer SmolLM2.
    opt = torch.optim.AdamW(model.parameters(), lr=st.lr, weight_decay=st.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, st, total_steps))
    return model, opt, sched


def lr_factor(step, st, total_steps):
    """Linear warm-up over st.warmup_steps, then constant or cosine down to 10%."""
    if step < st.warmup_steps:
        return (step + 1) / st.warmup_steps
    if st.lr_scheduler_type == "constant":
        return 1.0
    progress = min(1.0, (step - st.warmup_steps) / max(1, total_steps - st.warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_step(student, opt, sched, batch, teacher_logps, routed, teachers, *, st, temperature=1.0,
               kl_estimator="k1", rl_adv=None, sft=False, teacher_topk=None, kl_mode="sampled"):
    """Advantage + IS policy loss over micro-batches, then one FSDP2 optimizer step.

    The student's logp is computed once, with grad; its detached value is the pi_old of
    the advantage (exact because there is one optimizer step per rollout batch). Each
    micro-batch's loss is divided by the global token (or sequence) count over the world
    size, because FSDP2 averages gradients over ranks: the accumulated gradient is exactly
    that of the loss aggregated over the whole global batch.

    `rl_adv` [B] (mixed mode, plain RL) is the sequence-level advantage from external
    rewards; the teachers' weighted KL is subtracted from it. `sft` (the off-policy
    baseline: the batch was written by the teacher) trains by plain NLL instead.

    `kl_mode` topk | full (`teacher_topk`: name -> the teacher's top-k log-probs and ids,
    teachers.score): the KL is not in the advantage but a loss term, each routed teacher's
    coef x the KL of the student's whole distribution (at the sampling temperature) to the
    teacher's top-k plus a rest bucket (topk) or to all of it (full, k = V), at every
    response position (loss.kl_loss); rl_adv, if any, still drives the policy-gradient term.

    Bad numbers: if any rank saw a non-finite teacher log-prob or loss, or the gradient
    norm is non-finite, every rank skips the optimizer step (gradients dropped, weights,
    AdamW state and lr schedule untouched). Returns (the step's metric sums as 0-d tensors
    for `reduce_sums`, the reasons the step was skipped: [] = it was taken)."""
    world = dist.get_world_size()
    bad_teacher = any(not torch.isfinite(v).all() for v in teacher_logps.values())
    denom = agg_denom(batch.response_mask, st.loss_agg_mode).float()
    dist.all_reduce(denom)
    coefs = {t.name: t.coef for t in teachers}
    # metrics as sums over tokens, kept on the device (no host sync per micro-batch), so
    # micro-batches and ranks combine exactly in one all-reduce at the end of the step
    sums = {}

    def add(key, value):
        sums[key] = sums.get(key, 0.0) + value.detach().double()

    for start in range(0, len(batch), st.micro_batch_size):
        idx = list(range(start, min(start + st.micro_batch_size, len(batch))))
        mb = batch.select(idx)
        mb_tl = {n: v[idx] for n, v in teacher_logps.items()}
        mb_routed = {n: v[idx] for n, v in routed.items()}
        mask = mb.response_mask
        mb_rl = None if rl_adv is None else rl_adv[idx][:, None]
        if teacher_topk:  # the KL is a loss term, computed inside the chunked head
            top = {n: (v[idx], i[idx]) for n, (v, i) in teacher_topk.items()}
            logp, kl = rollout.response_logp(student, mb, temperature,
                                             kl_to=_kl_to(teachers, top, mb_routed, kl_mode))
            adv = torch.zeros_like(logp) if mb_rl is None else mb_rl.expand_as(logp).float()
        else:
            logp = rollout.response_logp(student, mb, temperature)
            adv = opd_advantages(logp.detach(), mb_tl, coefs, mb_routed, mask, rl_adv=mb_rl,
                                 kind=kl_estimator)
        if sft:
            loss = sft_loss(logp, mask, agg=st.loss_agg_mode, denom=denom / world)
            m = {"is_ratio_mean": torch.ones(()), "clip_frac": torch.zeros(())}
        else:
            loss, m = policy_loss(logp, mb.rollout_logp, adv, mask, clip=st.clip, level=st.is_level,
                                  agg=st.loss_agg_mode, denom=denom / world)
        if teacher_topk and not sft:
            loss = loss + kl_loss(kl.sum(-1), mask, agg=st.loss_agg_mode, denom=denom / world)
            add("kl_dist", (kl.sum(-1) * mask).sum())
        loss.backward()
        n_tok = mask.sum()
        add("loss", loss / world)
        add("tokens", n_tok)
        add("kl", -opd_advantages(logp.detach(), mb_tl, coefs, mb_routed, mask, kind="k1").sum())
        add("ratio", m["is_ratio_mean"] * n_tok)
        add("clip", m["clip_frac"] * n_tok)
        for t in teachers:
            tmask = mask * mb_routed[t.name][:, None]
            add(f"kl/{t.name}", ((logp.detach() - mb_tl[t.name]) * tmask).sum())
            add(f"tokens/{t.name}", tmask.sum())
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), st.max_grad_norm or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    why = skip_reasons(bad_teacher, sums["loss"], grad_norm)
    if not why:
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    add("grad_norm", grad_norm / world)  # the same on every rank: the sum over ranks / world
    return sums, why


def _kl_to(teachers, top, routed, mode):
    """For rollout.response_logp: (the student's log-probs [b, t, V] of a chunk of positions,
    their slice) -> [b, t, n teachers], each routed teacher's coef x its KL (loss.py)."""
    def kl_to(student_logp, sl):
        terms = []
        for t in teachers:
            values, ids = top[t.name][0][:, sl], top[t.name][1][:, sl]
            if mode == "full":  # k = V: the teacher's whole distribution, put back in vocabulary order
                kl = reverse_kl_full(student_logp, torch.zeros_like(student_logp).scatter(-1, ids, values))
            else:
                kl = reverse_kl_topk(student_logp, values, ids)
            terms.append(t.coef * routed[t.name][:, None] * kl)
        return torch.stack(terms, -1)
    return kl_to


def skip_reasons(bad_teacher, loss, grad_norm):
    """Why this step must not update the weights, agreed by all ranks (one small all-reduce):
    a non-finite value on any rank skips the step everywhere, so the shards stay in step."""
    flags = torch.tensor([float(bad_teacher), float(not torch.isfinite(loss))], device=loss.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    names = ["non-finite teacher log-prob", "non-finite loss", "non-finite grad norm"]
    return [n for n, bad in zip(names, [*flags.tolist(), not torch.isfinite(grad_norm)]) if bad]


def reduce_sums(sums, device):
    """Sum a dict of scalars (tensors or numbers) over all ranks: one all-reduce."""
    keys = sorted(sums)
    vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys])
    dist.all_reduce(vec)
    return dict(zip(keys, vec.tolist()))
