"""Logging: metrics.jsonl, TensorBoard and the console, on rank 0.

Owns the `Logger` (one JSON object per step in metrics.jsonl, the same scalars in
TensorBoard, validation examples as TensorBoard text), the assembly of a step's metrics
from its reduced sums (`step_metrics`), the one-line console progress (`progress_line`)
and `banner` (print on rank 0). The metric names are the contract in DESIGN.md. Also the
quiet console: library output goes to output_dir/logs/rank<R>.log (`quiet_console`).
"""

import atexit
import faulthandler
import functools
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist

import validation


class Logger:
    """metrics.jsonl + TensorBoard + one console line per step, on rank 0 only."""

    def __init__(self, output_dir, enabled, keep_through=-1):
        """Appends to output_dir's metrics.jsonl after dropping what an earlier run logged after
        step `keep_through` (a resumed run: its checkpoint's step; a fresh start: -1, all of
        it); TensorBoard hides those steps too (purge_step)."""
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            path = os.path.join(output_dir, "metrics.jsonl")
            if os.path.exists(path):
                with open(path) as f:
                    kept = [line for line in f if _step_of(line) <= keep_through]
                with open(path + ".tmp", "w") as f:
                    f.writelines(kept)
                os.replace(path + ".tmp", path)
            self.tb = SummaryWriter(log_dir=output_dir, purge_step=keep_through + 1)
            self.jsonl = open(path, "a")

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


def _step_of(line):
    """The step of a metrics.jsonl line; infinity for a line a crash cut short."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return float("inf")


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
        print(msg, file=console, flush=True)


# ----------------------------------------------------------------------------------------
# The console shows opd's own lines; everything else goes to a per-rank log file.
# Why file descriptors, not logging levels: native code (torch/gloo C++ warnings, vLLM's
# CPU kernels, OpenMP) writes to fd 2 directly, tqdm bars and `warnings` go to whatever
# sys.stderr is, and libraries bind logging handlers to sys.stdout/err (vLLM at import,
# transformers on first use). So fds 1 and 2, and with them sys.stdout/err and everything
# above, point at the log; opd's lines go to copies of the terminal's fds taken first.

console = None  # opd's lines (banner); None = sys.stdout (not quiet: --verbose, tests)
console_err = None  # opd's errors and tracebacks; None = sys.stderr
log_path = None  # where this process's library output goes, once quiet_console ran


def quiet_console(rank):
    """From now on send this process's output to a log file, a temporary one until
    `library_log_to` knows output_dir; opd's lines and tracebacks still reach the terminal."""
    global console, console_err, log_path
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.fdopen(os.dup(1), "w", buffering=1)
    console_err = os.fdopen(os.dup(2), "w", buffering=1)
    fd, log_path = tempfile.mkstemp(prefix=f"opd-rank{rank}-", suffix=".log")
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)  # Python's lines in order with native ones
    sys.excepthook = functools.partial(_show_traceback, sys.excepthook)
    faulthandler.enable(file=console_err)  # a crash in native code still shows Python's stack here
    atexit.register(_drop_empty_temp_log, log_path)


def library_log_to(output_dir, rank):
    """Move the library log to output_dir/logs/rank<R>.log and keep writing there
    (appending: a resumed run keeps the log of the run it resumes)."""
    global log_path
    path = os.path.join(output_dir, "logs", f"rank{rank}.log")
    if log_path in (None, path):  # not quiet (--verbose): the console shows everything
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_path, "rb") as src, open(path, "ab") as dst:
        dst.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} rank {rank}: {' '.join(sys.argv)}\n".encode())
        shutil.copyfileobj(src, dst)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.remove(log_path)
    log_path = path
    if rank == 0:
        print(f"library output: {os.path.join(output_dir, 'logs')}/rank<R>.log (--verbose shows it here)",
              file=console, flush=True)


def error(msg):
    """`opd: error: msg` on the terminal, plus where the library log is if it says anything."""
    print(f"opd: error: {msg}\n{_log_hint()}", end="", file=console_err or sys.stderr, flush=True)


def _log_hint():
    if log_path is None or os.path.getsize(log_path) == 0:
        return ""
    return f"opd: library output (warnings, vLLM, torch) is in {log_path}\n"


def _show_traceback(hook, *exc):
    """An uncaught exception: the usual traceback into the log (torch's excepthook, set
    later, wraps this one and prefixes [rankN]), and the same on the terminal."""
    hook(*exc)
    text = "".join(traceback.format_exception(*exc)) + _log_hint()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        text = "".join(f"[rank{os.environ.get('RANK', '0')}]: {line}" for line in text.splitlines(True))
    console_err.write(text)
    console_err.flush()


def _drop_empty_temp_log(path):
    """At exit: a run that stopped before output_dir (a config error) leaves no empty file."""
    if os.path.exists(path) and os.path.getsize(path) == 0:
        os.remove(path)
