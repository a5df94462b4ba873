"""Run under torchrun by test_multi_teacher.py: do teacher placements change the scores?

Every rank builds its own fixed batch (prompt lengths differ by tag, as with per-tag
templates), then two teachers score it twice: on disjoint rank groups (first half / second
half of the ranks) and both on all ranks. Rank 0 writes the largest difference, the
routing and whether the moved samples kept their token ids to argv[3]."""

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


if __name__ == "__main__":
    math_path, general_path, out = sys.argv[1:4]
    _, world, device = opd.init_distributed("cpu")
    rank = dist.get_rank()
    batch = fake_batch(rank, 290)
    tag_ids = {t: i for i, t in enumerate(sorted(TAGS))}
    half = list(range(world // 2)), list(range(world // 2, world))
    scores, routed = {}, {}
    for placement, (ranks_a, ranks_b) in {"disjoint": half, "overlapping": ([], [])}.items():
        ts = [T.load_teacher("math", math_path, device=device, dtype=torch.float32, ranks=ranks_a,
                             tag_included=["add", "sub"], micro_batch_size=2),
              T.load_teacher("general", general_path, device=device, dtype=torch.float32, ranks=ranks_b,
                             micro_batch_size=3)]
        held = [t.name for t in ts if t.model is not None]
        scores[placement], routed[placement], _ = T.score(ts, batch, tag_ids)
        if placement == "disjoint":
            assert held == (["math"] if rank in ranks_a else ["general"]), held  # never loads the other
    diff = torch.stack([(scores["disjoint"][n] - scores["overlapping"][n]).abs().max() for n in ("math", "general")])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
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
                       "same_ids": bool(same), "routing_ok": bool(ok_routing)}, f)
    dist.destroy_process_group()
