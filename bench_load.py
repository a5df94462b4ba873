"""Loading benchmark: host memory and time of loading a ~0.6B model, whole vs sharded.

    python bench_load.py               # builds the model once (.cache/bench-load-qwen3-0.6b)
    python bench_load.py --ranks 1 2 4

A randomly initialised model with Qwen3-0.6B's shape (596M parameters, tied embeddings,
bf16 safetensors; nothing downloaded) is loaded (a) as the student (fp32 master weights)
and (b) as a teacher (bf16), each
  old: `from_pretrained` (the whole model on every rank), then fully_shard, then .to(device)
  new: `loading.build_sharded` (meta build, fully_shard, each rank reads its own rows)
with the same fully_shard calls as student.build_student / teachers.load_teacher, in a
fresh `torchrun` per row. Each rank reports its resident memory before loading (imports and
process group only), its peak (ru_maxrss), the model's share (peak - before) and the load
time. Runs are sequential; the file is in the page cache after the build (warm reads).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
MODEL_DIR = os.path.join(ROOT, ".cache", "bench-load-qwen3-0.6b")


def build_model(path):
    """Qwen3-0.6B's shape, random weights, saved as bf16 (written to a temp dir, renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=40960, tie_word_embeddings=True, rope_theta=1000000.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = path + ".tmp"
    model.save_pretrained(tmp)
    os.replace(tmp, path)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {path}: {n / 1e6:.0f}M parameters, bf16", flush=True)


def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def worker(role, how, out_dir):
    """One rank: load the model `how` as `role`, write this rank's numbers to out_dir."""
    import resource
    import time

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    import loading

    dist.init_process_group("gloo")
    dtype = torch.float32 if role == "student" else torch.bfloat16  # master weights / teacher dtype
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

    def shard(model):  # as student.build_student / teachers.load_teacher do
        if role == "teacher":
            model.eval().requires_grad_(False)
        layers = model.model.layers
        for i, block in enumerate(layers):
            last = role == "student" and i == len(layers) - 1
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=not last)
        fully_shard(model, mesh=mesh, mp_policy=mp)

    before = rss_kib()
    dist.barrier()
    t0 = time.perf_counter()
    if how == "old":
        model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=dtype, attn_implementation="sdpa")
        shard(model)
        model.to("cpu")
    else:
        model = loading.build_sharded(MODEL_DIR, dtype=dtype, shard=shard, device="cpu", attn_implementation="sdpa")
    seconds = time.perf_counter() - t0
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"before": before, "peak": peak, "after": rss_kib(), "seconds": seconds,
                   "local_shard": local / 1024}, f)
    dist.barrier()
    dist.destroy_process_group()


def run(role, how, ranks):
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
        r = subprocess.run([TORCHRUN, f"--nproc_per_node={ranks}", __file__, "--worker", role, how, out],
                           cwd=ROOT, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            sys.exit(f"{role} {how} {ranks} ranks failed:\n{r.stderr[-3000:]}")
        return [json.load(open(os.path.join(out, f"rank{i}.json"))) for i in range(ranks)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    if not os.path.exists(MODEL_DIR):
        build_model(MODEL_DIR)
    gib = lambda kib: f"{kib / 2**20:.2f}"
    print("| role | path | ranks | rank | before GiB | peak GiB | share GiB | local shard GiB | load s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for role in ("student", "teacher"):
        for ranks in args.ranks:
            for how in ("old", "new"):
                for i, d in enumerate(run(role, how, ranks)):
                    print(f"| {role} ({'fp32' if role == 'student' else 'bf16'}) | {how} | {ranks} | {i} "
                          f"| {gib(d['before'])} | {gib(d['peak'])} | {gib(d['peak'] - d['before'])} "
                          f"| {gib(d['local_shard'])} | {d['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:5])
    else:
        main()
