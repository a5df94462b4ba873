"""Run under torchrun by test_logprobs.py: does chunking change an FSDP2 student's step?

Builds the real sharded student (student.build_student) twice from one checkpoint and
runs one real training step (student.train_step, two micro-batches) on each: once with
the plain unchunked log-probs, once with a chunk budget of 3 positions (so the head runs
inside the root's forward in 3 checkpointed chunks, recomputed in backward). Each rank
has its own batch. Rank 0 writes the largest differences of the no-grad scores and of
the gradients (gathered full tensors, captured just before the optimizer step), the
largest gradient, the step's loss and grad norm per variant, how many chunks a no-grad
call ran, and any FSDP2 warning, to argv[2]."""

import functools
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rollout  # noqa: E402  (sets the vLLM env first)
import opd  # noqa: E402
import student as student_lib  # noqa: E402
import teachers as T  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

TEMPERATURE = 0.7


def fake_batch(rank, vocab):
    g = torch.Generator().manual_seed(10 + rank)
    prompts = [torch.randint(3, vocab, (3 + 2 * i,), generator=g) for i in range(4)]
    resps = [torch.randint(3, vocab, (n,), generator=g) for n in (7, 4, 6, 2)]
    return rollout.collate(prompts, resps, [torch.zeros(len(r)) for r in resps],
                           torch.arange(4), ["t"] * 4, pad_id=0)


def one_step(path, st, device, batch, chunked):
    """(no-grad logp, {name: full grad}, step sums) of one train_step from `path`."""
    student, opt, sched = student_lib.build_student(path, st, device, 10)
    score = functools.partial(rollout.response_logp, chunked=chunked)
    with torch.no_grad():
        logp = score(student, batch, TEMPERATURE)
    batch.rollout_logp = logp.clone()  # on-policy: importance ratio 1, no clipping
    teacher = T.Teacher(name="t")
    tl = {"t": logp - torch.rand(logp.shape, generator=torch.Generator().manual_seed(dist.get_rank()))}
    grads = {}
    step = opt.step

    def snapshot_then_step():
        grads.update({n: p.grad.full_tensor() for n, p in student.named_parameters()})
        step()

    opt.step = snapshot_then_step
    plain = rollout.response_logp
    rollout.response_logp = score  # what train_step calls
    try:
        sums, skipped = student_lib.train_step(student, opt, sched, batch, tl,
                                               {"t": torch.ones(4, dtype=torch.bool)}, [teacher],
                                               st=st, temperature=TEMPERATURE)
    finally:
        rollout.response_logp = plain
    assert not skipped, skipped
    return logp, grads, student_lib.reduce_sums(sums, device)


def count_chunks(path, st, device, batch):
    student, _, _ = student_lib.build_student(path, st, device, 10)
    calls = []
    plain = rollout._head_scores
    rollout._head_scores = lambda *a: calls.append(1) or plain(*a)
    try:
        with torch.no_grad():
            rollout.response_logp(student, batch)
    finally:
        rollout._head_scores = plain
    return len(calls)


if __name__ == "__main__":
    path, out = sys.argv[1:3]
    _, world, device = opd.init_distributed("cpu")
    st = opd.Config(pretrain=path).student_train
    st.micro_batch_size = 2
    vocab = student_lib.build_student(path, st, device, 10)[0].config.vocab_size
    batch = fake_batch(dist.get_rank(), vocab)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref_logp, ref_grads, ref_sums = one_step(path, st, device, batch, chunked=False)
        rollout.LOGP_CHUNK_ELEMENTS = 2 * vocab * 3  # micro-batches of 2 rows: 3 positions a chunk
        logp, grads, sums = one_step(path, st, device, batch, chunked=True)
        n_chunks = count_chunks(path, st, device, batch.select([0, 1]))
    diff = torch.stack([(logp - ref_logp).abs().max(),
                        max((grads[n] - g).abs().max() for n, g in ref_grads.items())])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"logp_diff": diff[0].item(), "grad_diff": diff[1].item(),
                       "grad_max": max(g.abs().max().item() for g in ref_grads.values()),
                       "n_grads": len(grads), "n_params": len(ref_grads),
                       "sums": sums, "ref_sums": ref_sums, "n_chunks": n_chunks,
                       "fsdp_warnings": [str(w.message) for w in caught if "FSDP" in str(w.message)]}, f)
    dist.barrier()
    dist.destroy_process_group()
