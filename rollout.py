"""Rollouts: the colocated vLLM engine on every rank, sampling, and weight sync.

Owns
  * `make_engine`   one in-process vLLM engine per training rank (colocated). With
                    tensor_parallel_size=1 every rank is its own data-parallel replica;
                    with TP > 1 the ranks of a TP group run one engine together through
                    vLLM's `external_launcher` (torchrun SPMD) and see the same prompts.
  * `generate`      prompts (token ids) -> a padded `Rollout` batch: token ids, the
                    sampler's logprob of every sampled token (`rollout_logp`, the
                    behaviour policy mu) and the response mask.
  * `sync_weights`  streams the FSDP2 student's full tensors into the local engine, one
                    parameter at a time (never the whole state dict at once).
  * `sleep` / `wake_up`  free the engine's memory during training where the platform
                    can (GPU); a no-op on CPU, where vLLM has no sleep mode.

Multi-turn episodes (agent.py) use the same Rollout: the response part then holds every
turn, with `response_mask` 1 only on the tokens the engine sampled.

Knows nothing about teachers or losses. Simplified: vLLM must
run in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): tensors cannot be pickled to an engine
process and external_launcher requires it anyway.
"""

import logging
import math
import os
from dataclasses import dataclass

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the console to our step lines
# Every weight reload warns "RotaryEmbedding: Failed to load weights": rotary layers have
# no weights (their cos/sin cache is a buffer vLLM puts back). Drop that line, and only it.
logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
    lambda record: not record.getMessage().startswith("RotaryEmbedding: Failed to load weights"))

import torch
import torch.distributed as dist
from torch.nn.utils.rnn import pad_sequence


def _bind_cpu_threads():
    """Give each local rank its own slice of cores for vLLM's OpenMP threads (CPU only).

    Without this, two engines on one machine both pin to the same cores and starve."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() or local_world <= 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    per = max(1, (os.cpu_count() or 1) // local_world)
    first = (local_rank * per) % (os.cpu_count() or 1)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{first}-{first + per - 1}"


@dataclass
class Rollout:
    """One rank's batch of sampled sequences, left-padded prompts + right-padded responses.

    input_ids[:, :P] is the prompt (left padded), input_ids[:, P:] the response (right
    padded). Every per-token tensor of the loss is [B, R] and lines up with the response.
    """

    input_ids: torch.Tensor     # [B, P+R] long
    attention_mask: torch.Tensor  # [B, P+R] long
    response_mask: torch.Tensor  # [B, R] float, 1 on sampled tokens
    rollout_logp: torch.Tensor   # [B, R] float, the sampler's logprob of each token
    prompt_len: int              # P
    group: torch.Tensor          # [B] long, index of the prompt the sample answers
    tags: list                   # [B] the sample's tag (routing key)

    @property
    def position_ids(self):
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def __len__(self):
        return self.input_ids.shape[0]

    def response_ids(self):
        """The sampled token ids of every (single-turn) response, without padding."""
        lengths = self.response_mask.sum(-1).long().tolist()
        return [row[:n] for row, n in zip(self.input_ids[:, self.prompt_len:].tolist(), lengths)]

    def to(self, device):
        t = lambda x: x.to(device)
        return Rollout(t(self.input_ids), t(self.attention_mask), t(self.response_mask),
                       t(self.rollout_logp), self.prompt_len, t(self.group), self.tags)

    def select(self, idx):
        """Rows `idx` (a list or tensor of indices) as a new Rollout."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.input_ids.device)
        return Rollout(self.input_ids[idx], self.attention_mask[idx], self.response_mask[idx],
                       self.rollout_logp[idx], self.prompt_len, self.group[idx],
                       [self.tags[i] for i in idx.tolist()])


def make_engine(model_path, *, dtype, tensor_parallel_size=1, max_model_len=None, seed=0,
                gpu_memory_utilization=0.5, enforce_eager=True, kv_cache_gib=1,
                enable_sleep_mode=False):
    """Build this rank's vLLM engine. Call on every rank, after torch.distributed is up."""
    _bind_cpu_threads()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    from vllm import LLM

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    kwargs = {}
    if tensor_parallel_size > 1:
        # SPMD under torchrun: every rank of a TP group holds one shard and must be fed
        # the same prompts; vLLM forms world // TP data-parallel replicas.
        kwargs.update(distributed_executor_backend="external_launcher",
                      data_parallel_size=world // tensor_parallel_size)
    return LLM(
        model=model_path,
        dtype=dtype,  # explicit: vLLM-CPU would run an fp32 checkpoint in bf16 otherwise
        tensor_parallel_size=tensor_parallel_size,
        max_model_len=max_model_len,
        # TP ranks must sample identically; DP replicas must not sample identically.
        seed=seed + rank // tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
        enable_sleep_mode=enable_sleep_mode,
        # logprobs after temperature scaling, i.e. of the distribution actually sampled
        logprobs_mode="processed_logprobs",
        **kwargs,
    )


def generate(llm, prompts, tags, *, n, max_tokens, temperature=1.0, top_p=1.0, top_k=-1,
             pad_id=0):
    """Sample `n` responses to every prompt (a list of token-id lists) on the local engine.

    Returns a Rollout with len(prompts) * n rows; the n samples of a prompt are adjacent
    and share `group`."""
    from vllm.inputs import TokensPrompt

    params = sampling_params(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k)
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                        use_tqdm=False)
    prompt_rows, resp_rows, logp_rows, group, sample_tags = [], [], [], [], []
    for i, (out, tag) in enumerate(zip(outs, tags)):
        for o in out.outputs:
            ids = list(o.token_ids)
            lp = sampled_logprobs(o, ids)
            prompt_rows.append(torch.tensor(prompts[i], dtype=torch.long))
            resp_rows.append(torch.tensor(ids, dtype=torch.long))
            logp_rows.append(torch.tensor(lp, dtype=torch.float32))
            group.append(i)
            sample_tags.append(tag)
    return collate(prompt_rows, resp_rows, logp_rows, torch.tensor(group), sample_tags, pad_id)


def sampling_params(**kw):
    """vLLM SamplingParams that return token ids and each sampled token's logprob, cheaply.

    Checked against vLLM 0.32.0. `logprobs=0` returns the sampled token's own logprob and
    nothing else; `flat_logprobs` keeps them in flat lists instead of a dict of Logprob
    objects per token; `detokenize=False` skips the text, which with logprobs on also
    means one tokenizer call per sampled token (we decode what we need ourselves). On the
    tiny peer-benchmark workload these two flags took a bare generate from 72-75 to 60 ms."""
    from vllm import SamplingParams

    return SamplingParams(logprobs=0, flat_logprobs=True, detokenize=False, **kw)


def sampled_logprobs(completion, ids):
    """The sampler's logprob of every sampled token of one vLLM CompletionOutput."""
    flat = completion.logprobs  # FlatLogprobs: one entry per position with logprobs=0
    assert flat.token_ids == ids, "vLLM returned logprobs for other tokens than it sampled"
    return flat.logprobs


def collate(prompt_rows, resp_rows, logp_rows, group, tags, pad_id, mask_rows=None):
    """Pad prompts on the left and responses on the right into one Rollout. `mask_rows`:
    which response tokens were sampled (multi-turn rows hold observations too); None = all."""
    flip = [p.flip(0) for p in prompt_rows]
    prompt = pad_sequence(flip, batch_first=True, padding_value=pad_id).flip(1)
    prompt_mask = pad_sequence([torch.ones_like(p) for p in flip], batch_first=True).flip(1)
    resp = pad_sequence(resp_rows, batch_first=True, padding_value=pad_id)
    resp_attn = pad_sequence([torch.ones_like(r) for r in resp_rows], batch_first=True)
    resp_mask = resp_attn if mask_rows is None else pad_sequence(mask_rows, batch_first=True)
    logp = pad_sequence(logp_rows, batch_first=True, padding_value=0.0)
    return Rollout(
        input_ids=torch.cat([prompt, resp], 1),
        attention_mask=torch.cat([prompt_mask, resp_attn], 1),
        response_mask=resp_mask.float(),
        rollout_logp=logp,
        prompt_len=prompt.shape[1],
        group=group,
        tags=list(tags),
    )


def sync_weights(llm, model, dtype=None, bucket_mb=256):
    """Load the trainer's current weights into the local engine.

    `model` is the FSDP2-sharded student. Its parameters are all-gathered in buckets of
    about `bucket_mb` (one collective per bucket, not one per parameter: on gloo each
    collective costs ~1 ms) and handed to vLLM as a stream, so peak extra memory is one
    bucket, never the whole state dict. Every rank of the student's mesh must call this.
    Checked against vLLM 0.32.0: `reload_weights` re-runs the checkpoint loader over the
    stream (calling model.load_weights directly fails on CPU, which repacks weights)."""

    tied = tied_head_name(model)

    def stream():
        for name, full in gathered_params(model, bucket_mb * 2**20):
            full = full.to(dtype) if dtype is not None else full
            yield name, full
            if tied and name == tied[0]:
                yield tied[1], full

    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream()})
    # Cached prefixes were computed with the old weights.
    llm.reset_prefix_cache()


def tied_head_name(model):
    """(embedding name, head name) when the output head is the input embedding, else None.

    A tied model lists the shared matrix once, under the embedding's name. vLLM's CPU
    backend keeps a separately repacked copy of the head, which a reload of the embedding
    alone leaves stale ("ParallelLMHead: Failed to load weights"; sampler logprobs then
    off by up to 0.07 on the tied test model), so the sync sends the matrix under the
    head's name too. Where vLLM's head and embedding share one tensor (GPU), that loads
    the same values twice. Checked on vLLM 0.32.0."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return None
    names = {id(m): n for n, m in model.named_modules()}
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or id(head) not in names:
        return None
    return f"{names[id(emb)]}.weight", f"{names[id(head)]}.weight"


def gathered_params(model, bucket_bytes):
    """Yield (name, full tensor) for every parameter, gathering FSDP2 shards in buckets.

    FSDP2 shards dim 0 like torch.chunk: rank r holds rows [r*c, (r+1)*c) with
    c = ceil(rows / world), the last ranks fewer or none. Padding every local chunk to c
    rows makes all ranks' buckets the same size, so one all_gather_into_tensor moves it."""
    bucket, size = [], 0
    for name, p in model.named_parameters():
        bucket.append((name, p.detach()))
        size += p.numel() * p.element_size()
        if size >= bucket_bytes:
            yield from _gather_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        yield from _gather_bucket(bucket)


def _gather_bucket(bucket):
    # No gather for plain tensors (a model without FSDP, or FSDP2's root parameters while
    # they are unsharded: the root keeps them gathered after a forward), nor for a mesh of
    # one rank, whose local shard is the whole tensor (gathering it anyway cost a 1-rank
    # SmolLM2-135M student's sync 315 of its 458 ms).
    sharded = lambda p: hasattr(p, "device_mesh") and p.device_mesh.size() > 1
    yield from ((n, p.to_local() if hasattr(p, "device_mesh") else p) for n, p in bucket if not sharded(p))
    bucket = [(n, p) for n, p in bucket if sharded(p)]
    if not bucket:
        return
    group = bucket[0][1].device_mesh.get_group()
    world = dist.get_world_size(group)
    chunks, flat = [], []
    for name, p in bucket:
        rows = -(-p.shape[0] // world)
        local = p.to_local()
        pad = torch.zeros((rows - local.shape[0], *local.shape[1:]), dtype=local.dtype,
                          device=local.device)
        flat.append(torch.cat([local, pad]).reshape(-1))
        chunks.append((name, p.shape, rows))
    flat = torch.cat(flat)
    out = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
    dist.all_gather_into_tensor(out, flat, group=group)
    per_rank = out.view(world, -1)
    offset = 0
    for name, shape, rows in chunks:
        n = rows * math.prod(shape[1:])
        parts = per_rank[:, offset:offset + n].reshape(world * rows, *shape[1:])
        offset += n
        yield name, parts[:shape[0]]


def _can_sleep():
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


def sleep(llm):
    """Free the engine's weights and KV cache during training (GPU only; CPU is a no-op).

    Level 1 offloads weights to host memory; level 2 would drop them and make the next
    sync the only source of weights, which is fine but unforgiving. Checked on vLLM 0.32."""
    if _can_sleep():
        llm.sleep(level=1)


def wake_up(llm):
    if _can_sleep():
        llm.wake_up()


def response_logp(model, batch, temperature=1.0):
    """Log-probability under `model` of every response token of `batch`: [B, R].

    The same function scores the student (with grad, at the sampling temperature) and the
    teachers (under no_grad, temperature 1), so both read the very token ids vLLM sampled.
    Only the last R+1 positions go through the LM head: prompts can be long."""
    R = batch.response_mask.shape[1]
    # use_cache=False: transformers would otherwise build a KV cache of the whole batch
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, logits_to_keep=R + 1, use_cache=False).logits
    logits = logits[:, :-1].float() / temperature
    targets = batch.input_ids[:, batch.prompt_len:]
    # logsumexp + gather instead of a full log_softmax: one [B, R, V] buffer fewer
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
