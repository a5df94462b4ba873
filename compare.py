"""The teaching benchmark: on-policy distillation against plain RL, mixed mode and
off-policy distillation, with the same budget, over one or more seeds.

    python compare.py                                   # the toy world, every method, seed 0
    python compare.py --task long --seeds 0 1 2 --one_seed rl mixed   # the long-answer toy
    python compare.py --task agentic                    # the games: opd, rl, mixed
    python compare.py --methods opd rl -- --max_steps 50   # flags after `--` go to every run

Tasks: `toy` (the default config: 7-token answers), `long` (configs/long_toy.yaml:
~36-token worked additions), `agentic` (configs/agentic_toy.yaml: multi-turn games;
off_policy is rlvr only). Each (method, seed) is one `torchrun --nproc_per_node=2 opd.py`
run of the task's config with `--seed S`; only the method flags differ:

    opd         pure on-policy distillation, the sampled-token KL as advantage (the default)
    opd_topk    OPD with the KL to the teacher's top-64 (+ rest bucket) as a loss term
    opd_full    OPD with the full-vocabulary KL as a loss term
    rl          plain RL from the reward only (no teacher), GRPO advantage
    mixed       GRPO advantage from the reward minus the teacher's reverse KL
    off_policy  SFT on the teacher's answers. Per seed they are sampled once, up front,
                with vLLM (teacher_data.py: G answers for every training prompt), and that
                cost is reported on its own line, not in SFT's training time.

Runs go seed by seed, each seed running every method, so the machine's slow spells
spread over the methods. `--one_seed` names methods run on the first seed only.

Writes, into --out (default results/): `compare[_long|_agentic].md`, the table: per
method, the seeds, start and final greedy validation score, how many seeds reached 90% of
the teacher's score and, over those, the mean (min-max) of the first validation step,
training seconds and tokens at which they did; and `.png`: validation score against step
and against training time, the mean over seeds with a min-max band. Each run's output
directory and console log go to runs/compare/<task>-<method>-s<seed> (replaced on a
rerun; `--reuse` keeps finished runs of the same command, to continue an interrupted
benchmark).

Training time is the sum of the step times (`timing/elapsed_s`): validation is left
out, so every method is charged only for its own work. Tokens are prompt + response
tokens trained on (`throughput/tokens_total`). The 90% crossing is only seen at
validation steps (every `validation.eval_steps`).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
METHODS = {
    "opd": [],
    "opd_topk": ["--opd_kl_mode", "topk"],  # the teacher's top-64 + a rest bucket, as a loss term
    "opd_full": ["--opd_kl_mode", "full"],  # the teacher's whole distribution, as a loss term
    "rl": ["--teacher.model_name_or_path", ""],  # no teacher: the math (rlvr) or env (agentic) reward
    "mixed": ["--use_opd"],
    "off_policy": ["--off_policy"],  # + --data.file_name <the teacher's answers, teacher_data.py>
}
LABELS = {"opd": "OPD, sampled-token KL", "opd_topk": "OPD, top-64 KL", "opd_full": "OPD, full KL",
          "rl": "plain RL (reward only)", "mixed": "mixed (RL + OPD)", "off_policy": "off-policy SFT"}
TASKS = {  # name: (preset, score, output stem, plot title)
    "toy": (None, "accuracy", "compare", "Toy arithmetic world (7-token answers)"),
    "long": ("configs/long_toy.yaml", "accuracy", "compare_long", "Long-answer toy (worked addition, ~36 tokens)"),
    "agentic": ("configs/agentic_toy.yaml", "success", "compare_agentic", "Agentic toy (guess the number, Nim)"),
}


def _preset(task):
    return ["--config", os.path.join(ROOT, TASKS[task][0])] if TASKS[task][0] else []


def launch(cmd, run_dir, reuse):
    """Run one torchrun job into run_dir (its console -> console.log); returns its wall seconds."""
    done = os.path.join(run_dir, "compare_run.json")
    before = json.load(open(done)) if reuse and os.path.exists(done) else {}
    if before.get("cmd") == cmd[1:]:  # the same run, finished
        print(f"[compare] reuse {run_dir}", flush=True)
        return before["wall_s"]
    print(f"[compare] {' '.join(cmd[1:])}", flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own scratch: a rerun starts clean
    os.makedirs(run_dir)
    t0 = time.time()
    with open(os.path.join(run_dir, "console.log"), "w") as log:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    json.dump({"wall_s": wall, "cmd": cmd[1:]}, open(done, "w"))
    return wall


def teacher_data(task, seed, extra, reuse):
    """The off-policy baseline's dataset for this seed (teacher_data.py); (path, its cost, wall s)."""
    run_dir = os.path.join(ROOT, "runs", "compare", f"{task}-teacher-data-s{seed}")
    out = os.path.join(run_dir, "data.jsonl")
    preset = _preset(task)
    wall = launch([TORCHRUN, "--nproc_per_node=2", os.path.join(ROOT, "teacher_data.py"), *preset,
                   "--seed", str(seed), *extra, "--out", out], run_dir, reuse)
    return out, json.load(open(out + ".json")), wall


def run(task, method, seed, extra, reuse, data_file=None):
    """One opd.py run; returns (its metrics.jsonl rows, its wall seconds)."""
    run_dir = os.path.join(ROOT, "runs", "compare", f"{task}-{method}-s{seed}")
    preset = _preset(task)
    data = ["--data.file_name", data_file] if data_file else []
    if data_file and not TASKS[task][0]:  # own data files get no validation by default: keep the toy's
        import toy

        data += ["--validation.file_name", os.path.join(toy.TOY_DIR, "val.jsonl")]
    wall = launch([TORCHRUN, "--nproc_per_node=2", os.path.join(ROOT, "opd.py"), *preset, *METHODS[method],
                   "--seed", str(seed), "--output_dir", run_dir, *extra, *data], run_dir, reuse)
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))], wall


def summarize(rows, teacher_acc, key="val/accuracy"):
    """One run's numbers from its metrics.jsonl rows (`key`: the score)."""
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


def spread(values, fmt):
    """'mean (min-max)' of the values, or the one value."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def aggregate(runs):
    """A method's seeds (a list of summarize() dicts) -> the table's numbers: means and
    ranges of the final score, and of step / seconds / tokens at 90% over the seeds that
    reached it."""
    hit = [s for s in runs if s["step90"] is not None]
    return {"n": len(runs), "reached": len(hit), "start": [s["start"] for s in runs],
            "final": [s["final"] for s in runs], "step90": [s["step90"] for s in hit],
            "s90": [s["s90"] for s in hit], "tok90": [s["tok90"] for s in hit],
            "step_s": [s["seconds"] / s["steps"] for s in runs]}


def table(results, teacher_acc, name="accuracy"):
    """results: method -> aggregate(). A markdown table, one row per method."""
    short = name[:3] if name == "accuracy" else name
    lines = [f"Teacher greedy validation {name}: **{teacher_acc:.3f}**; target (90%): {0.9 * teacher_acc:.3f}. "
             "Cells: mean (min-max) over seeds; the at-90% columns over the seeds that reached it.", "",
             f"| method | seeds | start {short} | final {short} | reached 90% | step at 90% | train s at 90% | "
             "tokens at 90% | s/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, a in results.items():
        at = (lambda k, f: spread(a[k], f) if a[k] else "not reached")
        lines.append(f"| {LABELS[m]} | {a['n']} | {spread(a['start'], '.3f')} | {spread(a['final'], '.3f')} | "
                     f"{a['reached']}/{a['n']} | {at('step90', '.0f')} | {at('s90', '.0f')} | {at('tok90', ',.0f')} | "
                     f"{spread(a['step_s'], '.2f')} |")
    return "\n".join(lines) + "\n"


def verdict(results):
    """Does an OPD variant reach 90% in fewer steps and less training time than off-policy
    SFT, averaged over seeds (only methods whose every seed reached it count)?"""
    sft = results.get("off_policy")
    opds = {m: a for m, a in results.items() if m.startswith("opd") and a["reached"] == a["n"]}
    if not sft or not any(m.startswith("opd") for m in results):
        return ""
    mean = statistics.mean
    if sft["reached"] < sft["n"]:
        return ("Off-policy SFT did not reach 90% on every seed; " +
                (f"{', '.join(LABELS[m] for m in opds)} did.\n" if opds else "no OPD variant did either.\n"))
    if not opds:
        return "No OPD variant reached 90% of the teacher on every seed; off-policy SFT did.\n"
    steps = min(opds, key=lambda m: mean(opds[m]["step90"]))
    secs = min(opds, key=lambda m: mean(opds[m]["s90"]))
    say = lambda m, k, f: f"{LABELS[m]} {format(mean(results[m][k]), f)}"
    return (f"Fewest steps to 90%: {say(steps, 'step90', '.0f')} vs {say('off_policy', 'step90', '.0f')} "
            f"({'OPD ahead' if mean(opds[steps]['step90']) < mean(sft['step90']) else 'SFT ahead or even'}); "
            f"least training time: {say(secs, 's90', '.0f')} s vs {say('off_policy', 's90', '.0f')} s "
            f"({'OPD ahead' if mean(opds[secs]['s90']) < mean(sft['s90']) else 'SFT ahead or even'}).\n")


def curves(rows, key):
    """[(step, elapsed training s, score)] at the validation steps of one run."""
    elapsed, val = 0.0, []
    for r in rows:  # validation rows carry the elapsed time of their step (0 before step 1)
        elapsed = r.get("timing/elapsed_s", elapsed)
        if key in r:
            val.append((r["step"], elapsed, r[key]))
    return val


def plot(all_rows, teacher_acc, path, key="val/accuracy", title="Toy arithmetic world"):
    """all_rows: method -> [one run's rows per seed]. Mean over seeds, min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for m, seeds in all_rows.items():
        cs = [curves(rows, key) for rows in seeds]
        n = min(len(c) for c in cs)  # the same validation schedule: the seeds line up
        step = [cs[0][i][0] for i in range(n)]
        secs = [statistics.mean(c[i][1] for c in cs) for i in range(n)]
        ys = [[c[i][2] for c in cs] for i in range(n)]
        mean = [statistics.mean(y) for y in ys]
        label = LABELS[m] + (f" ({len(cs)} seeds)" if len(cs) > 1 else "")
        for ax, x in zip(axes, (step, secs)):
            line, = ax.plot(x, mean, marker=".", label=label)
            if len(cs) > 1:
                ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.15)
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
                                 epilog="Flags after `--` are passed to every opd.py (and teacher_data.py) run.")
    ap.add_argument("--task", choices=list(TASKS), default="toy")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                    help="default: all six (toy, long), opd rl mixed (agentic)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="each method runs once per seed")
    ap.add_argument("--one_seed", nargs="*", choices=list(METHODS), default=[],
                    help="methods run on the first seed only")
    ap.add_argument("--reuse", action="store_true", help="keep runs that finished before (continue a benchmark)")
    ap.add_argument("--out", default=os.path.join(ROOT, "results"), help="where the table and plot go")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    agentic = args.task == "agentic"
    methods = args.methods or (["opd", "rl", "mixed"] if agentic else list(METHODS))
    if agentic and "off_policy" in methods:
        sys.exit("compare: off_policy is rlvr only (not with --task agentic)")
    _, name, stem, title = TASKS[args.task]
    os.makedirs(args.out, exist_ok=True)
    all_rows, walls, data_cost, data_walls = {m: [] for m in methods}, {m: [] for m in methods}, [], []
    for seed in args.seeds:  # seed-major: every method runs on each seed before the next seed
        for m in methods:
            if m in args.one_seed and seed != args.seeds[0]:
                continue
            data_file = None
            if m == "off_policy":
                data_file, cost, wall = teacher_data(args.task, seed, extra, args.reuse)
                data_cost.append(cost)
                data_walls.append(wall)
            rows, wall = run(args.task, m, seed, extra, args.reuse, data_file)
            all_rows[m].append(rows)
            walls[m].append(wall)
    teacher_acc = next((r[f"val/teacher_{name}"] for seeds in all_rows.values() for rows in seeds for r in rows
                        if f"val/teacher_{name}" in r), None)
    if teacher_acc is None:
        sys.exit(f"compare: no run logged val/teacher_{name}; include a method with a teacher")
    results = {m: aggregate([summarize(rows, teacher_acc, f"val/{name}") for rows in seeds])
               for m, seeds in all_rows.items()}
    text = table(results, teacher_acc, name) + "\n" + verdict(results)
    if data_cost:
        c = data_cost[0]
        text += (f"\nOff-policy SFT's teacher dataset, sampled once per seed with vLLM on {c['ranks']} ranks "
                 f"(teacher_data.py; not in SFT's train s): {c['prompts']:,} prompts x "
                 f"{c['answers'] // c['prompts']} answers, {spread([d['response_tokens'] for d in data_cost], ',.0f')} "
                 f"tokens in {spread([d['sampling_s'] for d in data_cost], '.0f')} s "
                 f"(+ {spread([d['engine_start_s'] for d in data_cost], '.0f')} s engine start-up).\n")
    text += ("\nRun wall seconds (mean per run, start-up and validation included): "
             + ", ".join(f"{LABELS[m]} {statistics.mean(w):.0f}" for m, w in walls.items())
             + f"; all runs together {sum(map(sum, walls.values())) + sum(data_walls):.0f} s.\n")
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(text)
    plot(all_rows, teacher_acc, os.path.join(args.out, f"{stem}.png"), f"val/{name}", title)
    print(text + f"\nwrote {args.out}/{stem}.md and {args.out}/{stem}.png")


if __name__ == "__main__":
    main()
