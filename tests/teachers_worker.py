"""Run under torchrun by test_multi_teacher.py: do teacher placements change the scores?

Every rank builds its own fixed batch (prompt lengths differ by tag, as with per-tag
templates), then two teachers score it twice: on disjoint rank groups (first half / second
half of the ranks) and both on all ranks. Rank 0 writes the largest difference, the
routing, whether the moved samples kept their token ids, and whether the teachers' own
greedy decoding (members of a group holding different numbers of prompts) matches HF
`generate`, to argv[3]."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rollout  # noqa: E402  (sets the vLLM env first)
import opd  # noqa: E402
import teachers as T  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

TAGS = ["add", "sub", "poem"]


def fake_batch(rank, vocab):
    g = torch.Generator().manual_seed(100 + rank)
    tags = [TAGS[(i + rank) % 3] for i in range(6)]
    prompts = [torch.randint(3, vocab, (4 + 3 * TAGS.index(t),), generator=g) for t in tags]
    resps = [torch.randint(3, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g) for _ in tags]
    return rollout.collate(prompts, resps, [torch.zeros(len(r)) for r in resps],
                           torch.arange(len(tags)), tags, pad_id=0)


def greedy_matches_hf(ts, rank, device, paths):
    """Greedy decoding on a sub-group against HF generate: the members hold 1 or 3
    prompts, so one runs a dummy micro-batch (math: 2 per micro-batch) while the other
    decodes left-padded prompts. Returns an int tensor, 1 if every answer matched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = next(t for t in ts if t.model is not None)
    eos = AutoTokenizer.from_pretrained(paths[t.name]).eos_token_id
    g = torch.Generator().manual_seed(7 + rank)
    prompts = [torch.randint(3, 290, (5 + i,), generator=g).tolist() for i in range(1 + 2 * (rank % 2))]
    got = T.generate(t, prompts, max_tokens=6, eos_id=eos, pad_id=0, device=device)
    ref_model = AutoModelForCausalLM.from_pretrained(paths[t.name])
    ref = [ref_model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=eos,
                              pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    ref = [r[:r.index(eos) + 1] if eos in r else r for r in ref]
    ok = torch.tensor(int(got == ref and len(got) == len(prompts)))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return ok


if __name__ == "__main__":
    math_path, general_path, out = sys.argv[1:4]
    _, world, device = opd.init_distributed("cpu")
    rank = dist.get_rank()
    batch = fake_batch(rank, 290)
    tag_ids = {t: i for i, t in enumerate(sorted(TAGS))}
    half = list(range(world // 2)), list(range(world // 2, world))
    scores, routed, tops = {}, {}, {}
    for placement, (ranks_a, ranks_b) in {"disjoint": half, "overlapping": ([], [])}.items():
        ts = [T.load_teacher("math", math_path, device=device, dtype=torch.float32, ranks=ranks_a,
                             tag_included=["add", "sub"], micro_batch_size=2),
              T.load_teacher("general", general_path, device=device, dtype=torch.float32, ranks=ranks_b,
                             micro_batch_size=3)]
        held = [t.name for t in ts if t.model is not None]
        scores[placement], routed[placement], _, tops[placement] = T.score(ts, batch, tag_ids, topk=4)
        if placement == "disjoint":
            assert held == (["math"] if rank in ranks_a else ["general"]), held  # never loads the other
            greedy_ok = greedy_matches_hf(ts, rank, device, {"math": math_path, "general": general_path})
    diff = torch.stack([(scores["disjoint"][n] - scores["overlapping"][n]).abs().max() for n in ("math", "general")])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    # the top-k (values and ids) moved between groups equals the top-k computed in place
    top_diff = torch.stack([(tops["disjoint"][n][0] - tops["overlapping"][n][0]).abs().max()
                            + (tops["disjoint"][n][1] != tops["overlapping"][n][1]).sum() for n in ("math", "general")])
    dist.all_reduce(top_diff, op=dist.ReduceOp.MAX)
    top_ok = torch.tensor(int(tops["overlapping"]["general"][1].shape[-1] == 4))
    # the moved copies of this rank's samples carry exactly its token ids
    everyone, _ = T._all_gather_batch(batch, tag_ids)
    B, P, R = len(batch), batch.prompt_len, batch.response_mask.shape[1]
    mine = everyone.input_ids[rank * B:(rank + 1) * B]
    Pm = everyone.prompt_len
    same = torch.tensor(int(torch.equal(mine[:, Pm - P:Pm + R], batch.input_ids)))
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    poem = torch.tensor([t == "poem" for t in batch.tags])
    ok_routing = torch.tensor(int(
        torch.equal(routed["disjoint"]["math"].cpu(), ~poem) and bool(routed["disjoint"]["general"].all())
        and bool((scores["disjoint"]["math"][poem] == 0).all())
        and bool((scores["disjoint"]["general"] * batch.response_mask < 0).any())))
    dist.all_reduce(ok_routing, op=dist.ReduceOp.MIN)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"max_diff_math": diff[0].item(), "max_diff_general": diff[1].item(),
                       "same_ids": bool(same), "routing_ok": bool(ok_routing),
                       "greedy_matches_hf": bool(greedy_ok), "max_diff_topk": top_diff.max().item(),
                       "topk_shape_ok": bool(top_ok)}, f)
    dist.barrier()  # rank 0 may still be writing: a peer tearing down early makes gloo abort
    dist.destroy_process_group()
