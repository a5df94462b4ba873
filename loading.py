"""Loading: build a model already sharded with FSDP2, never a full copy on any rank.

`from_pretrained` then `fully_shard` puts the whole model in host memory on every rank
before sharding it: 8 ranks of a 32B teacher in bf16 want 8 x 64 GB of host memory. Here
every rank instead
  1. builds the model from its config with the parameters on the meta device (no memory),
  2. runs the caller's `fully_shard` calls on it (sharding meta tensors is free),
  3. allocates only its own shards (`to_empty`),
  4. fills each shard by reading just its rows from the safetensors file(s).
FSDP2 shards dim 0, and dim-0 rows of a row-major tensor are one contiguous byte range of
the file, so step 4 is a seek and a read per parameter: no communication, the same on gloo
and NCCL, and resident memory grows by one slice at a time.

Also here: `memory_estimate`, what a run will need per rank, from configs alone.
"""

import contextlib
import json
import math
import os
import struct

import torch
import torch.nn as nn

# safetensors dtype names (the header's "dtype") -> torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}


class LoadError(ValueError):
    """A checkpoint that cannot be loaded into the model (the message names the key and file)."""


def build_sharded(path, *, dtype, shard, device, attn_implementation="sdpa"):
    """The model in `path` (HF layout, safetensors), sharded by `shard(model)` (the caller's
    fully_shard calls), on `device`, holding only this rank's shards of the weights.

    Like `from_pretrained`, the model comes back in eval mode with the checkpoint's
    generation config. Parameters are `dtype` whatever the file's dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(path)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    if os.path.exists(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path)
    # A tied head stays the embedding's Parameter through fully_shard and to_empty (FSDP2
    # re-registers a shared parameter on every module that holds it; checked against torch
    # 2.13 / transformers 5.19, and asserted in tests/test_loading.py).
    shard(model)
    # to_empty re-allocates buffers too (uninitialised), so keep the real ones built above
    # (rotary inv_freq: computed in __init__, not in the checkpoint) and put them back.
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    load_local_shards(model, path)
    return model.eval()


@contextlib.contextmanager
def params_on_meta():
    """Every parameter created inside goes to the meta device; buffers stay real.

    Not `with torch.device("meta")`: that also puts buffers computed in __init__ (rotary
    inv_freq) on meta, and they are not in the checkpoint to load them back from. Layer
    constructors still call torch.empty for their weights, but those pages are never
    touched before the tensor is replaced, so they cost no resident memory. A parameter
    that is already meta is kept as is: tie_weights re-assigns the embedding's Parameter
    to the head, and wrapping it anew would silently untie them."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_local_shards(model, path):
    """Fill every parameter's local FSDP2 shard, and every persistent buffer, from `path`.

    A tied output head shares its tensor with the embedding, so the shared tensor is read
    once, under whichever of its names the checkpoint has (usually the embedding's)."""
    index = read_index(path)
    tensors, names = {}, {}
    # keep_vars: the Parameters themselves (DTensors after fully_shard); a tied tensor
    # appears once per name. Non-persistent buffers are not in the state dict.
    for name, t in model.state_dict(keep_vars=True).items():
        tensors[id(t)] = t
        names.setdefault(id(t), []).append(name)
    with torch.no_grad():
        for key, t in tensors.items():
            found = [n for n in names[key] if n in index]
            if not found:
                raise LoadError(f"{' / '.join(names[key])} is not in the checkpoint {describe_files(path)} (a "
                                "model whose checkpoint transformers renames on load is not supported here)")
            read_rows(*index[found[0]], t, found[0])


def local_rows(t):
    """(this rank's tensor, its first row) of a parameter: a Shard(0) DTensor or a plain one.

    FSDP2 shards dim 0 like torch.chunk: rank r holds rows [r*c, (r+1)*c) with
    c = ceil(rows / world), the last ranks fewer or none (checked against torch 2.13)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return t.data, 0
    if tuple(t.placements) != (Shard(0),):
        raise NotImplementedError(f"only FSDP2's Shard(0) layout is loaded, got {t.placements}")
    rows, world, rank = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    c = -(-rows // world)
    start = min(rank * c, rows)
    local = t.to_local()
    expected = (min(c, rows - start), *t.shape[1:])
    if tuple(local.shape) != expected:
        raise RuntimeError(f"rank {rank}/{world}: local shard {tuple(local.shape)} of a {tuple(t.shape)} "
                           f"tensor, expected {expected}: FSDP2's layout is not the torch.chunk one")
    return local, start


def read_rows(file, entry, data_start, t, name):
    """Read this rank's rows of `t` from `file` into its local shard (plain seek + read,
    not mmap: only the slice ever becomes resident)."""
    local, start = local_rows(t)
    if list(entry["shape"]) != list(t.shape):
        raise ValueError(f"{name}: shape {entry['shape']} in {file}, but the model has {list(t.shape)}")
    if entry["dtype"] not in DTYPES:
        raise LoadError(f"{name}: dtype {entry['dtype']} in {file} is not supported (known: {', '.join(DTYPES)})")
    file_dtype = DTYPES[entry["dtype"]]
    if local.numel() == 0:
        return  # a rank past the last row: nothing to read
    row_bytes = math.prod(t.shape[1:]) * file_dtype.itemsize  # 0-d: one "row" of one element
    # same dtype on the CPU: read straight into the shard, else via one slice-sized buffer
    direct = local.dtype == file_dtype and local.device.type == "cpu" and local.is_contiguous()
    buf = local if direct else torch.empty(local.shape, dtype=file_dtype)
    view, done = memoryview(buf.view(-1).view(torch.uint8).numpy()), 0
    with open(file, "rb", buffering=0) as f:
        f.seek(data_start + entry["data_offsets"][0] + start * row_bytes)
        while done < len(view):  # readinto may return less than asked
            n = f.readinto(view[done:])
            if not n:
                raise ValueError(f"{name}: {file} ends before the tensor does")
            done += n
    if not direct:
        local.copy_(buf)  # converts the dtype (and moves to the GPU)


def read_index(path):
    """name -> (file, header entry, byte offset of the data section) for every tensor in
    `path`'s `model.safetensors` or the files its `model.safetensors.index.json` lists.

    The safetensors layout: 8 bytes little-endian header length N, N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}} (offsets relative to the data
    section, which starts right after the header), then the raw row-major data."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_file):
        with open(index_file) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    index = {}
    for name in files:
        file = os.path.join(path, name)
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        index.update({key: (file, entry, 8 + n) for key, entry in header.items()})
    return index


def local_dir(path):
    """`path` if it is a directory; else a Hugging Face Hub id, fetched into (or found in)
    the hub cache: config, tokenizer and safetensors files only."""
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])


def describe_files(path):
    index_file = os.path.join(path, "model.safetensors.index.json")
    return index_file if os.path.exists(index_file) else os.path.join(path, "model.safetensors")


# ----------------------------------------------------------------------------- memory estimate


def param_counts(path):
    """(all parameters, the largest block, the root's own: embeddings, head, final norm)
    of the model in `path`, from its config alone (built on the meta device). A tied
    head is counted once, as it is stored once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    count = lambda m: sum(p.numel() for p in m.parameters())
    total = count(model)
    blocks = [count(b) for b in model.model.layers]
    return total, max(blocks), total - sum(blocks)


def estimate_bytes(student_path, student_dtype, teachers, world, infer_dtype, kv_cache_gib,
                   gpu_memory_utilization, device):
    """Per-rank bytes of a run, by part (see `memory_estimate`); the device's memory under
    "available"."""
    size = lambda d: getattr(torch, d).itemsize if isinstance(d, str) else d.itemsize
    n, block, root = param_counts(student_path)
    est = {"student params+grads+AdamW (fp32, sharded)": n * (4 + 4 + 8) / world}
    # FSDP2 gathers the root unit (embeddings, head, norm) for the whole forward and one
    # block at a time on top, in the compute dtype
    gathered = [(root + block) * size(student_dtype)]
    per_rank = [0.0] * world  # teacher shards each rank holds
    held = [[] for _ in range(world)]
    for name, path, dtype, ranks in teachers:
        t_n, t_block, t_root = param_counts(path)
        group = list(ranks) or list(range(world))
        for r in group:
            per_rank[r] += t_n * size(dtype) / len(group)
            held[r].append(f"{name} {dtype}/{len(group)}")
        gathered.append((t_root + t_block) * size(dtype))
    worst = max(range(world), key=lambda r: per_rank[r])
    if teachers:
        est[f"teacher shards on the worst rank ({worst}: {', '.join(held[worst])})"] = per_rank[worst]
    est["gathered: root unit + one block (largest model, compute dtype)"] = max(gathered)
    if device.startswith("cuda"):
        total = torch.cuda.mem_get_info(torch.device(device))[1]
        est[f"vLLM (gpu_memory_utilization {gpu_memory_utilization})"] = gpu_memory_utilization * total
    else:
        est[f"vLLM weights ({infer_dtype})"] = n * size(infer_dtype)
        est["vLLM KV cache"] = kv_cache_gib * 2**30
        with open("/proc/meminfo") as f:
            mem_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        total = mem_kib * 1024 / local
    est["total"] = sum(est.values())
    est["available"] = total
    return est


def memory_estimate(student_path, student_dtype, teachers, world, infer_dtype="bfloat16", kv_cache_gib=1,
                    gpu_memory_utilization=0.5, device="cpu"):
    """Lines describing the per-rank memory a run needs (activations not counted).

    `teachers`: (name, path, dtype string, ranks: a list, empty = all ranks) each. The
    student's parameters, gradients and AdamW state are fp32 and FSDP2 shards all of them;
    each teacher's shard lives only on its group's ranks (the worst rank is shown); every
    rank has its own vLLM engine with a full copy of the student. On CPU the device is the
    host: MemTotal divided by the ranks on this node."""
    est = estimate_bytes(student_path, student_dtype, teachers, world, infer_dtype, kv_cache_gib,
                         gpu_memory_utilization, device)
    gib = lambda b: f"{b / 2**30:8.2f} GiB" if b >= 2**30 else f"{b / 2**20:8.1f} MiB"
    total, available = est.pop("total"), est.pop("available")
    lines = [f"memory per rank, estimated ({world} ranks, {device}; activations not counted):"]
    lines += [f"  {gib(b)}  {what}" for what, b in est.items()]
    verdict = "fits" if total <= available else "DOES NOT FIT"
    lines.append(f"  {gib(total)}  total, of {gib(available).strip()} per rank: {verdict}")
    return lines
