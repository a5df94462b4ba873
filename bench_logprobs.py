"""Memory benchmark: one `rollout.response_logp` call on a long response, chunked vs not.

    python bench_logprobs.py                     # vocab 151,936, 3072 response tokens
    python bench_logprobs.py --tokens 2048 --rounds 3

A tiny Qwen3-shaped model (2 layers, hidden 128) with Qwen3's 151,936-token vocabulary,
so the LM head's logits are what the call's memory is made of. Four variants, each in a
fresh subprocess (peak RSS = that process's ru_maxrss), rounds interleaved, medians
reported:
  * teacher: under no_grad (as teachers.score calls it);
  * student: with grad, then backward of the mean log-prob (as train_step does);
each unchunked (the plain [B, R, V] path, `chunked=False`) and chunked
(`rollout.LOGP_CHUNK_ELEMENTS`). "over start" is the peak minus the process's peak before
the call (model, batch and imports); seconds are the call (and its backward) alone.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = [("teacher", False), ("teacher", True), ("student", False), ("student", True)]


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def one(role, chunked, args):
    """Run one variant in this process; print its numbers as one JSON line."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    import rollout

    if args.chunk_log2 is not None:
        rollout.LOGP_CHUNK_ELEMENTS = 2 ** args.chunk_log2
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=args.vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg).to(getattr(torch, args.dtype))
    prompt, resp = torch.randint(3, args.vocab, (64,)), torch.randint(3, args.vocab, (args.tokens,))
    batch = rollout.collate([prompt], [resp], [torch.zeros(args.tokens)], torch.zeros(1, dtype=torch.long),
                            ["t"], pad_id=0)
    start = peak_gib()
    t0 = time.perf_counter()
    if role == "teacher":
        with torch.no_grad():
            logp = rollout.response_logp(model, batch, chunked=chunked)
    else:
        logp = rollout.response_logp(model, batch, temperature=0.7, chunked=chunked)
        logp.mean().backward()
    seconds = time.perf_counter() - t0
    print(json.dumps({"peak_gib": peak_gib(), "over_gib": peak_gib() - start, "seconds": seconds,
                      "mean_logp": logp.mean().item()}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size (Qwen3: 151936)")
    p.add_argument("--tokens", type=int, default=3072, help="response tokens of the one row scored")
    p.add_argument("--dtype", default="float32", help="model dtype (float32 | bfloat16)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of the four variants, interleaved")
    p.add_argument("--chunk_log2", type=int, help="chunk budget 2**N elements (default: rollout's)")
    p.add_argument("--one", nargs=2, metavar=("ROLE", "CHUNKED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args.one[0], args.one[1] == "1", args)
    runs = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for role, chunked in VARIANTS:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", role, str(int(chunked)),
                   "--vocab", str(args.vocab), "--tokens", str(args.tokens), "--dtype", args.dtype]
            cmd += [] if args.chunk_log2 is None else ["--chunk_log2", str(args.chunk_log2)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[role, chunked].append(json.loads(out.strip().splitlines()[-1]))
    import rollout

    budget = args.chunk_log2 or rollout.LOGP_CHUNK_ELEMENTS.bit_length() - 1
    print(f"One response_logp call: 1 row, {args.tokens} response tokens, vocab {args.vocab}, "
          f"{args.dtype}; chunk budget 2**{budget} elements; "
          f"median of {args.rounds} round(s)\n")
    print("| call | path | peak RSS GiB | over start GiB | seconds | mean logp |\n|---|---|---|---|---|---|")
    for role, chunked in VARIANTS:
        med = lambda key: statistics.median(r[key] for r in runs[role, chunked])
        what = "teacher (no_grad)" if role == "teacher" else "student (grad + backward)"
        print(f"| {what} | {'chunked' if chunked else 'unchunked'} | {med('peak_gib'):.2f} | "
              f"{med('over_gib'):.2f} | {med('seconds'):.2f} | {med('mean_logp'):.4f} |")


if __name__ == "__main__":
    main()
