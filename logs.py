"""Logging: metrics.jsonl, TensorBoard and the console, on rank 0.

Owns the `Logger` (one JSON object per step in metrics.jsonl, the same scalars in
TensorBoard, validation examples as TensorBoard text), the assembly of a step's metrics
from its reduced sums (`step_metrics`), the one-line console progress (`progress_line`)
and `banner` (print on rank 0). The metric names are the contract in DESIGN.md.
"""

import json
import os
import resource

import torch
import torch.distributed as dist

import validation


class Logger:
    """metrics.jsonl + TensorBoard + one console line per step, on rank 0 only."""

    def __init__(self, output_dir, enabled):
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=output_dir)
            self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a")

    def log(self, step, metrics, examples=()):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        if examples:
            self.tb.add_text("val/examples", "\n\n".join(examples), step)
        self.tb.flush()

    def close(self):
        if self.enabled:
            self.tb.close()
            self.jsonl.close()


def step_metrics(g, timing, t_each, scorers, all_tags, lr, device):
    """The step's metrics from its reduced sums `g` and this rank's phase `timing`; peak
    memory and each teacher's time are the slowest rank's (one MAX all-reduce)."""
    peaks = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                          *(t_each[t.name] for t in scorers)], device=device)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    rss, t_each = peaks[0].item(), dict(zip([t.name for t in scorers], peaks[1:].tolist()))
    return {
        "train/reverse_kl": g["kl"] / g["tokens"],
        "train/loss": g["loss"],
        "train/grad_norm": g["grad_norm"],
        "train/is_ratio_mean": g["ratio"] / g["tokens"],
        "train/clip_frac": g["clip"] / g["tokens"],
        "train/response_len": g["tokens"] / g["seqs"],
        "train/lr": lr,
        **{k: v for t in scorers for k, v in (
            (f"teacher/{t.name}/reverse_kl", g[f"kl/{t.name}"] / max(g[f"tokens/{t.name}"], 1)),
            (f"teacher/{t.name}/routed_frac", g[f"routed/{t.name}"] / g["seqs"]),
            (f"timing/teacher/{t.name}_s", t_each[t.name]))},
        **validation.per_tag_means(g, "reward", "mean", all_tags),
        **{f"timing/{phase}_s": s for phase, s in timing.items()},
        "throughput/tokens_per_s": g["all_tokens"] / timing["step"],
        "memory/peak_rss_gib": rss,
    }


def progress_line(step, max_steps, m, g):
    return (f"step {step:4d}/{max_steps} | kl {m['train/reverse_kl']:7.4f} | "
            f"reward {g['reward/sum'] / max(g['reward/n'], 1):5.3f} | "
            f"loss {m['train/loss']:8.4f} | gnorm {m['train/grad_norm']:7.3f} | "
            f"len {m['train/response_len']:5.1f} | rollout {m['timing/rollout_s']:5.2f}s teacher "
            f"{m['timing/teacher_s']:5.2f}s train {m['timing/train_s']:5.2f}s sync {m['timing/sync_s']:5.2f}s | "
            f"{m['throughput/tokens_per_s']:7.0f} tok/s")


def banner(msg):
    if dist.get_rank() == 0:
        print(msg, flush=True)
