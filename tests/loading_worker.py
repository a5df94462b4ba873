"""Run under torchrun by test_loading.py: does a model built by loading.build_sharded (or by
student.build_student / teachers.load_teacher, which use it) hold exactly the checkpoint?

argv: output json, then cases as name=path:dtype:how (how: fsdp = per-block fully_shard
then the root, as the student does; student; teacher). For each case, rank 0 writes the
largest difference of every full (all-gathered) parameter and of the logits against
`from_pretrained(path, dtype)`, whether the head is still the embedding's tensor, and the
local shard's rows of the widest MLP weight on every rank."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import loading  # noqa: E402


def shard_blocks(model):
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def build(path, dtype, how):
    if how == "fsdp":
        return loading.build_sharded(path, dtype=dtype, shard=shard_blocks, device="cpu")
    if how == "student":
        import opd
        import student

        st = opd.Config().student_train
        st.dtype = "float32"  # compute in fp32 too, so the logits compare exactly
        return student.build_student(path, st, "cpu", 1)[0]
    import teachers

    return teachers.load_teacher("t", path, device="cpu", dtype=dtype).model


def check(path, dtype, how):
    model = build(path, dtype, how)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    ref_params = dict(ref.named_parameters())
    param_diff = 0.0
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        assert full.dtype == dtype, (name, full.dtype)
        param_diff = max(param_diff, (full.float() - ref_params[name].float()).abs().max().item())
    ids = torch.randint(3, ref.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits_diff = (model(input_ids=ids).logits.float() - ref(input_ids=ids).logits.float()).abs().max().item()
    up = model.model.layers[0].mlp.up_proj.weight
    rows = torch.tensor([up.to_local().shape[0] if hasattr(up, "to_local") else up.shape[0]])
    all_rows = [torch.zeros_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(all_rows, rows)
    return {"param_diff": param_diff, "logits_diff": logits_diff,
            "tied": model.lm_head.weight is model.model.embed_tokens.weight,
            "n_params": len(list(model.named_parameters())),
            "buffers_diff": max((b - dict(ref.named_buffers())[n]).abs().max().item()
                                for n, b in model.named_buffers()),
            "requires_grad": any(p.requires_grad for p in model.parameters()),
            "training": model.training, "up_rows": [int(r) for r in all_rows]}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    results = {}
    for case in sys.argv[2:]:
        name, spec = case.split("=", 1)
        path, dtype, how = spec.rsplit(":", 2)
        results[name] = check(path, getattr(torch, dtype), how)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
