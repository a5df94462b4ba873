"""Validation and per-tag metrics.

Owns turning per-sample values (rewards, correctness) into per-tag sums that all ranks
reduce in one collective, and the evaluation pass: one answer per validation prompt on
this rank's share, scored by the external rewards, giving `val/<tag>/accuracy`,
`val/accuracy` and a few example generations; the teachers' own greedy accuracy
(`val/<tag>/teacher_accuracy`, once); and the before/after table printed at the end.

Simplified: accuracy is the mean reward of the rewards that cover a tag (1.0 = correct
for the rule and sandbox rewards); a single sample per prompt (no pass@k).
"""

import torch
import torch.distributed as dist

import rewards
import rollout
import teachers as teachers_lib
from student import reduce_sums


def per_tag_sums(sums, prefix, values, mask, tags, all_tags):
    """Add sum and count of `values` [B] (where `mask`) per tag and overall to `sums`."""
    values, mask = values.double().cpu(), mask.cpu()
    for tag in all_tags:
        sel = mask & torch.tensor([t == tag for t in tags], dtype=torch.bool)
        sums[f"{prefix}/{tag}/sum"], sums[f"{prefix}/{tag}/n"] = values[sel].sum(), sel.sum()
    sums[f"{prefix}/sum"], sums[f"{prefix}/n"] = values[mask].sum(), mask.sum()


def per_tag_means(g, prefix, name, all_tags):
    return {f"{prefix}/{tag}/{name}": g[f"{prefix}/{tag}/sum"] / g[f"{prefix}/{tag}/n"]
            for tag in all_tags if g[f"{prefix}/{tag}/n"] > 0}


def evaluate(llm, val_items, tokenizer, cfg, reward_cfgs, device, seed_key=None):
    """One answer per validation prompt (greedy by default) on this rank's share; the
    accuracy is the mean reward per tag. Returns (metrics, a few example lines)."""
    tp = cfg.student_infer.tensor_parallel_size
    rank, dp = dist.get_rank(), dist.get_world_size() // tp
    mine = val_items[rank // tp::dp]  # TP peers take the same share and count it once
    batch = rollout.generate(llm, [ids for ids, _ in mine], [r.get("tag", "") for _, r in mine], n=1,
                             max_tokens=cfg.response_length, temperature=cfg.validation.temperature,
                             pad_id=tokenizer.pad_token_id or 0, seed_key=seed_key)
    texts = tokenizer.batch_decode(batch.response_ids(), skip_special_tokens=True)
    reward, scored = rewards.score_samples(reward_cfgs, texts, [r for _, r in mine])
    scored &= rank % tp == 0
    sums = {}
    all_tags = sorted({r.get("tag", "") for _, r in val_items})
    per_tag_sums(sums, "val", reward, scored, batch.tags, all_tags)
    g = reduce_sums(sums, device)
    metrics = {"val/accuracy": g["val/sum"] / max(g["val/n"], 1), **per_tag_means(g, "val", "accuracy", all_tags)}
    examples = [f"[{r.get('tag', '')}] {r['messages'][-1]['content']!r} -> {t!r} (reward {x:.2f})"
                for (_, r), t, x in zip(mine[:cfg.validation.num_examples], texts, reward.tolist())]
    return metrics, examples if rank == 0 else []


def teacher_accuracy(teachers, val_items, tokenizer, cfg, reward_cfgs, device):
    """`val/<tag>/teacher_accuracy` and `val/teacher_accuracy`: each tag's teacher (the
    first in config order that routes the tag) answers that tag's validation prompts
    greedily, each member of its group a share. Every rank calls this; ranks outside a
    teacher's group skip it, and disjoint groups decode at the same time."""
    all_tags = sorted({r.get("tag", "") for _, r in val_items})
    owner = {tag: next((t.name for t in teachers if t.routes([tag])[0]), None) for tag in all_tags}
    reward, scored, tags = [torch.zeros(0)], [torch.zeros(0, dtype=torch.bool)], []
    for t in teachers:
        if t.model is None:
            continue
        items = [it for it in val_items if owner[it[1].get("tag", "")] == t.name]
        share = items[t.ranks.index(dist.get_rank())::len(t.ranks)]
        answers = teachers_lib.generate(t, [ids for ids, _ in share], max_tokens=cfg.response_length,
                                        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id or 0,
                                        device=device)
        texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
        r, ok = rewards.score_samples(reward_cfgs, texts, [rec for _, rec in share])
        reward.append(r.double())
        scored.append(ok)
        tags += [rec.get("tag", "") for _, rec in share]
    sums = {}
    per_tag_sums(sums, "val", torch.cat(reward), torch.cat(scored), tags, all_tags)
    g = reduce_sums(sums, device)
    return {"val/teacher_accuracy": g["val/sum"] / max(g["val/n"], 1),
            **per_tag_means(g, "val", "teacher_accuracy", all_tags)}


def summary(first, last, step, name="accuracy"):
    """The before/after table: per tag, the teacher's and the student's `name` (accuracy,
    or success in agentic mode)."""
    tags = sorted(k.split("/")[1] for k in last if k.startswith("val/") and k.endswith(f"/{name}")
                  and k.count("/") == 2)
    rows = [(tag, f"val/{tag}/") for tag in tags] + [("all", "val/")]
    cell = lambda m, key: f"{m[key]:.3f}" if key in m else "-"
    lines = [f"{'tag':<12} {'teacher':>8} {'student@0':>10} {f'student@{step}':>12}"]
    for tag, p in rows:
        lines.append(f"{tag:<12} {cell(first, f'{p}teacher_{name}'):>8} {cell(first, p + name):>10} "
                     f"{cell(last, p + name):>12}")
    return lines
