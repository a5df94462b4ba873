"""Validation and per-tag metrics.

Owns turning per-sample values (rewards, correctness) into per-tag sums that all ranks
reduce in one collective, and the evaluation pass: one answer per validation prompt on
this rank's share, scored by the external rewards, giving `val/<tag>/accuracy`,
`val/accuracy` and a few example generations.

Simplified: accuracy is the mean reward of the rewards that cover a tag (1.0 = correct
for the rule and sandbox rewards); a single sample per prompt (no pass@k).
"""

import torch
import torch.distributed as dist

import rewards
import rollout
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


def evaluate(llm, val_items, tokenizer, cfg, reward_cfgs, device):
    """One answer per validation prompt (greedy by default) on this rank's share; the
    accuracy is the mean reward per tag. Returns (metrics, a few example lines)."""
    tp = cfg.student_infer.tensor_parallel_size
    rank, dp = dist.get_rank(), dist.get_world_size() // tp
    mine = val_items[rank // tp::dp]  # TP peers take the same share and count it once
    batch = rollout.generate(llm, [ids for ids, _ in mine], [r.get("tag", "") for _, r in mine], n=1,
                             max_tokens=cfg.response_length, temperature=cfg.validation.temperature,
                             pad_id=tokenizer.pad_token_id or 0)
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
