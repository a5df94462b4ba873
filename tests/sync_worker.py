"""Run under torchrun by test_weight_sync.py: does vLLM sample from the trainer's weights?

Builds the real FSDP2 student and the real vLLM engine (opd.build_student,
rollout.make_engine), takes one big optimizer step, and compares the sampler's logprobs
with the trainer's recompute of the same tokens, before and after rollout.sync_weights.
argv: model dir, output json, vLLM tensor_parallel_size. Writes {"start", "before",
"after": max |diff|} (rank 0)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rollout  # noqa: E402  (sets the vLLM env before vLLM is imported)
import opd  # noqa: E402
import student as student_lib  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def max_diff(llm, student, prompts):
    batch = rollout.generate(llm, prompts, ["t"] * len(prompts), n=2, max_tokens=12)
    with torch.no_grad():
        logp = rollout.response_logp(student, batch)
    diff = ((logp - batch.rollout_logp).abs() * batch.response_mask).max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


if __name__ == "__main__":
    path, out, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = opd.Config(pretrain=path)
    cfg.student_train.lr = 0.05
    _, _, device = opd.init_distributed("cpu")
    student, opt, _ = student_lib.build_student(cfg.pretrain, cfg.student_train, device, cfg.max_steps)
    llm = rollout.make_engine(path, dtype="float32", max_model_len=64, seed=0,
                              tensor_parallel_size=tp)
    # TP peers must see the same prompts; data-parallel replicas may differ
    prompts = [[5, 6, 7 + dist.get_rank() // tp], [9, 10, 11, 12]]
    start = max_diff(llm, student, prompts)
    # one large step on an arbitrary loss moves every weight
    ids = torch.randint(3, 300, (2, 10))
    student(input_ids=ids).logits.logsumexp(-1).mean().backward()
    opt.step()
    before = max_diff(llm, student, prompts)
    rollout.sync_weights(llm, student, torch.float32)
    after = max_diff(llm, student, prompts)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"start": start, "before": before, "after": after}, f)
    dist.barrier()  # as in opd.py: no rank tears down while rank 0 still writes
    del llm
    if dist.is_initialized():
        dist.destroy_process_group()
