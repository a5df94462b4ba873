"""Step-time benchmark: where an OPD step's time goes, and what the rollout wrapper costs.

    python bench.py                 # the toy world on 2 ranks (builds it on first use)
    python bench.py --steps 20      # more steps

Prints two tables (`--teachers`: a third, per-teacher scoring time for two teachers on
disjoint vs shared ranks, and the teacher phase's share of the step):
  1. phase breakdown of `torchrun --nproc_per_node=2 opd.py` (the default config), mean
     over steps 2..N (step 1 pays one-off warm-up): rollout / teacher / train / sync, and
     each phase's share of the step;
  2. the rollout phase (`rollout.generate`: vLLM generate + logprob extraction + padding)
     against a bare `llm.generate` of the same prompts with the same sampling settings,
     on the same engine, interleaved so both see the same machine state.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def run_opd(steps, extra):
    """Mean metrics of steps 2..N of a 2-rank run (step 1 pays one-off warm-up)."""
    out = tempfile.mkdtemp(prefix="opd-bench-")
    cmd = [TORCHRUN, "--nproc_per_node=2", os.path.join(ROOT, "opd.py"), "--max_steps", str(steps),
           "--output_dir", out, "--validation.eval_steps", "0", *extra]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][1:]
    return {k: statistics.mean(r[k] for r in rows) for k in rows[0]}


def teacher_table(steps):
    """Two teachers (the toy teacher as a math teacher for `add` and a general one for all
    tags), placed on disjoint ranks (math on 0, general on 1) or both on both ranks."""
    import toy

    t = os.path.join(toy.TOY_DIR, "teacher")
    print(f"\nTwo teachers, 2 ranks, mean of steps 2..{steps}")
    print("| placement | math s | general s | teacher phase s | share of step |\n|---|---|---|---|---|")
    for name, (a, b) in {"disjoint (math: rank 0, general: rank 1)": ([0], [1]),
                         "overlapping (both on ranks 0, 1)": ([], [])}.items():
        cfg = tempfile.mktemp(suffix=".yaml")
        with open(cfg, "w") as f:
            f.write(f"teacher:\n  math: {{model_name_or_path: {t}, tag_included: [add], device_mapping: {a}}}\n"
                    f"  general: {{model_name_or_path: {t}, device_mapping: {b}}}\n")
        m = run_opd(steps, ["--config", cfg])
        print(f"| {name} | {m['timing/teacher/math_s']:.3f} | {m['timing/teacher/general_s']:.3f} | "
              f"{m['timing/teacher_s']:.3f} | {100 * m['timing/teacher_s'] / m['timing/step_s']:.1f}% |")


def phase_table(steps, extra):
    mean = run_opd(steps, extra)
    step = mean["timing/step_s"]
    print(f"\nOPD step, 2 ranks, mean of steps 2..{steps} (toy default config)")
    print("| phase | seconds | share of step |\n|---|---|---|")
    for phase in ("rollout", "reward", "teacher", "train", "sync"):
        s = mean[f"timing/{phase}_s"]
        print(f"| {phase} | {s:.3f} | {100 * s / step:.1f}% |")
    print(f"| step | {step:.3f} | 100% |")
    print(f"tokens/s {mean['throughput/tokens_per_s']:.0f}, response length "
          f"{mean['train/response_len']:.1f}, peak RSS {mean['memory/peak_rss_gib']:.2f} GiB/rank")


def rollout_vs_bare(rounds):
    """Worker body (under torchrun): bare vLLM generate vs rollout.generate, interleaved."""
    import rollout  # sets the vLLM environment first
    import torch.distributed as dist
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    import opd
    import data

    cfg = opd.Config()
    opd.init_distributed("cpu")
    tok = __import__("transformers").AutoTokenizer.from_pretrained(cfg.pretrain)
    items, _ = data.encode_prompts(data.read_jsonl(cfg.data.file_name), tok, cfg.prompt_length)
    batches = data.PromptBatches(items, cfg.rollout_batch_size, seed=0, dp_rank=dist.get_rank(),
                                 dp_size=dist.get_world_size())
    llm = rollout.make_engine(cfg.pretrain, dtype=cfg.student_infer.dtype,
                              max_model_len=cfg.prompt_length + cfg.response_length)
    n, R = cfg.num_return_sequences_in_group, cfg.response_length
    times = {0: [], 1: [], 2: []}  # bare, rollout.generate, rollout.generate seeded per request
    for i in range(rounds + 1):
        prompts = [ids for ids, _ in batches.next()]
        tags = ["t"] * len(prompts)
        # ignore_eos in none: same prompts and params; rotate who goes first
        for which in [(0, 1, 2), (1, 2, 0), (2, 0, 1)][i % 3]:
            dist.barrier()
            t = time.perf_counter()
            if which == 0:
                # the fastest way found to get the same tokens and sampled-token logprobs
                llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                             SamplingParams(n=n, max_tokens=R, logprobs=0, detokenize=False,
                                            flat_logprobs=True), use_tqdm=False)
            else:  # what opd.py runs: every request seeded from (seed, step, rank, prompt)
                rollout.generate(llm, prompts, tags, n=n, max_tokens=R,
                                 seed_key=None if which == 1 else (0, i, dist.get_rank()))
            dt = time.perf_counter() - t
            if i:  # round 0 warms up
                times[which].append(dt)
    if dist.get_rank() == 0:
        b, o, s = (statistics.median(times[k]) for k in (0, 1, 2))
        print(f"\nrollout phase vs bare vLLM generate, 2 ranks, median of {rounds} rounds")
        print("| | seconds | vs bare |\n|---|---|---|")
        print(f"| bare llm.generate | {b:.4f} | 1.000x |\n| rollout.generate, engine's random stream | {o:.4f} | "
              f"{o / b:.3f}x |\n| rollout.generate, seeded per request (opd.py) | {s:.4f} | {s / b:.3f}x |",
              flush=True)
    dist.barrier()  # as in opd.py: no rank tears down while rank 0 still prints
    del llm


if __name__ == "__main__":
    if "RANK" in os.environ:  # we are the torchrun worker
        rollout_vs_bare(int(sys.argv[sys.argv.index("--rounds") + 1]))
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="OPD steps to time")
    ap.add_argument("--rounds", type=int, default=10, help="bare-vs-rollout generate rounds")
    ap.add_argument("--teachers", action="store_true", help="only the two-teacher placement table")
    args, extra = ap.parse_known_args()
    sys.path.insert(0, ROOT)
    import toy

    toy.prepare()
    print(f"machine: {os.cpu_count()} CPU cores; torch threads per rank: 1 (torchrun default)")
    if args.teachers:
        teacher_table(args.steps)
        sys.exit(0)
    phase_table(args.steps, extra)
    subprocess.run([TORCHRUN, "--nproc_per_node=2", os.path.abspath(__file__), "--rounds",
                    str(args.rounds)], check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
