"""The teaching benchmark: on-policy distillation against plain RL, mixed mode and
off-policy distillation, on the toy world, with the same budget.

    python compare.py                    # all four methods at the default settings
    python compare.py --methods opd rl   # a subset
    python compare.py -- --max_steps 50  # flags after `--` go to every run of opd.py
    python compare.py --agentic          # the agentic toy (configs/agentic_toy.yaml): opd, rl, mixed

Each method is one `torchrun --nproc_per_node=2 opd.py` run with the default (toy) config
and the same seed, steps, batch, learning rate and validation schedule; only the method
flags differ:

    opd         pure on-policy distillation (the default)
    rl          plain RL from the math reward only (no teacher), GRPO advantage
    mixed       GRPO advantage from the math reward minus the teacher's reverse KL
    off_policy  SFT on answers the teacher sampled (the teacher's own rollouts)
    opd_topk    OPD with the KL to the teacher's top-k (+ rest bucket) as a loss term (opd_kl_mode topk)
    opd_full    OPD with the full-vocabulary KL as a loss term (opd_kl_mode full)
                (these two only when named: --methods opd opd_topk opd_full)

With --agentic every run starts from configs/agentic_toy.yaml (multi-turn games; the
reward of rl and mixed is the episodes' env reward, the score is greedy validation
success) and writes compare_agentic.md / compare_agentic.png; off_policy is rlvr only.

Writes, into --out (default results/): `compare.md` (the table: start and final greedy
validation accuracy, the first validation step, training seconds and tokens at which the
student reached 90% of the teacher's accuracy, tokens and seconds in all) and
`compare.png` (validation accuracy against step and against training time, one line per
method). Each run's own output directory and console log go to runs/compare/<method>
(replaced on a rerun).

Training time is the sum of the step times (`timing/elapsed_s`): validation is left
out, so every method is charged only for its own work. Tokens are prompt + response
tokens trained on (`throughput/tokens_total`). Simplified: one seed per method; the
90% crossing is only seen at validation steps (every `validation.eval_steps`).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
METHODS = {
    "opd": [],
    "rl": ["--teacher.model_name_or_path", ""],  # no teacher: the math (rlvr) or env (agentic) reward
    "mixed": ["--use_opd"],
    "off_policy": ["--off_policy"],
    "opd_topk": ["--opd_kl_mode", "topk"],  # the teacher's top-64 + a rest bucket, as a loss term
    "opd_full": ["--opd_kl_mode", "full"],  # the teacher's whole distribution, as a loss term
}
LABELS = {"opd": "on-policy distillation", "rl": "plain RL (reward only)",
          "mixed": "mixed (RL + OPD)", "off_policy": "off-policy distillation (SFT)",
          "opd_topk": "on-policy distillation, top-k KL", "opd_full": "on-policy distillation, full KL"}


def run(method, extra, agentic=False):
    """One opd.py run; returns (its validation rows, the whole run's wall seconds)."""
    run_dir = os.path.join(ROOT, "runs", "compare", ("agentic-" if agentic else "") + method)
    preset = ["--config", os.path.join(ROOT, "configs", "agentic_toy.yaml")] if agentic else []
    cmd = [TORCHRUN, "--nproc_per_node=2", os.path.join(ROOT, "opd.py"), *preset, *METHODS[method],
           "--output_dir", run_dir, *extra]
    print(f"[compare] {method}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own scratch: a rerun starts clean
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "console.log"), "w") as log:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return rows, time.time() - t0


def summarize(rows, teacher_acc, key="val/accuracy"):
    """The table's numbers for one method from its metrics.jsonl rows (`key`: the score)."""
    val = [r for r in rows if key in r]
    steps = [r for r in rows if "timing/elapsed_s" in r]
    hit = next((r for r in val if r[key] >= 0.9 * teacher_acc), None)
    return {
        "start": val[0][key], "final": val[-1][key],
        "best": max(r[key] for r in val),
        "step90": hit["step"] if hit else None,
        "s90": hit.get("timing/elapsed_s", 0.0) if hit else None,
        "tok90": hit.get("throughput/tokens_total", 0) if hit else None,
        "steps": steps[-1]["step"], "seconds": steps[-1]["timing/elapsed_s"],
        "tokens": steps[-1]["throughput/tokens_total"],
    }


def table(results, teacher_acc, walls, name="accuracy"):
    fmt = lambda v, f: "not reached" if v is None else format(v, f)
    short = name[:3] if name == "accuracy" else name
    lines = [f"Teacher greedy validation {name}: **{teacher_acc:.3f}**; target (90%): "
             f"{0.9 * teacher_acc:.3f}.", "",
             f"| method | start {short} | final {short} | best {short} | step at 90% | train s at 90% | "
             "tokens at 90% | steps | train s | tokens | run wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, s in results.items():
        lines.append(f"| {LABELS[m]} | {s['start']:.3f} | {s['final']:.3f} | {s['best']:.3f} | "
                     f"{fmt(s['step90'], 'd')} | {fmt(s['s90'], '.0f')} | {fmt(s['tok90'], ',.0f')} | "
                     f"{s['steps']} | {s['seconds']:.0f} | {s['tokens']:,.0f} | {walls[m]:.0f} |")
    return "\n".join(lines) + "\n"


def plot(all_rows, teacher_acc, path, key="val/accuracy", title="Toy arithmetic world"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for m, rows in all_rows.items():
        elapsed, val = 0.0, []
        for r in rows:  # validation rows carry the elapsed time of their step (0 before step 1)
            elapsed = r.get("timing/elapsed_s", elapsed)
            if key in r:
                val.append((r["step"], elapsed, r[key]))
        axes[0].plot([v[0] for v in val], [v[2] for v in val], marker=".", label=LABELS[m])
        axes[1].plot([v[1] for v in val], [v[2] for v in val], marker=".", label=LABELS[m])
    for ax, xlabel in zip(axes, ("step", "training time (s, validation excluded)")):
        ax.axhline(teacher_acc, color="k", ls="--", lw=1, label="teacher")
        ax.axhline(0.9 * teacher_acc, color="gray", ls=":", lw=1, label="90% of teacher")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"greedy validation {key.split('/')[-1]}")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{title}, 2 ranks on CPU: student {key.split('/')[-1]} by method")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Flags after `--` are passed to every opd.py run.")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                    help="default: all four (rlvr), opd rl mixed (--agentic)")
    ap.add_argument("--agentic", action="store_true", help="the agentic toy: multi-turn games")
    ap.add_argument("--out", default=os.path.join(ROOT, "results"), help="where the table and plot go")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    methods = args.methods or (["opd", "rl", "mixed"] if args.agentic else ["opd", "rl", "mixed", "off_policy"])
    if args.agentic and "off_policy" in methods:
        sys.exit("compare: off_policy is rlvr only (not with --agentic)")
    name, stem = ("success", "compare_agentic") if args.agentic else ("accuracy", "compare")
    os.makedirs(args.out, exist_ok=True)
    all_rows, walls = {}, {}
    for m in methods:
        all_rows[m], walls[m] = run(m, extra, args.agentic)
    teacher_acc = next((r[f"val/teacher_{name}"] for rows in all_rows.values() for r in rows
                        if f"val/teacher_{name}" in r), None)
    if teacher_acc is None:
        sys.exit(f"compare: no run logged val/teacher_{name}; include a method with a teacher")
    results = {m: summarize(rows, teacher_acc, f"val/{name}") for m, rows in all_rows.items()}
    text = table(results, teacher_acc, walls, name)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(text)
    plot(all_rows, teacher_acc, os.path.join(args.out, f"{stem}.png"), f"val/{name}",
         "Agentic toy (guess the number, Nim)" if args.agentic else "Toy arithmetic world")
    print(text + f"\nwrote {args.out}/{stem}.md and {args.out}/{stem}.png")


if __name__ == "__main__":
    main()
