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
  * `response_logp` a model's logprob of every sampled token (student and teachers), the
                    LM head run a chunk of positions at a time (`LOGP_CHUNK_ELEMENTS`).

Multi-turn episodes (agent.py) use the same Rollout: the response part then holds every
turn, with `response_mask` 1 only on the tokens the engine sampled.

Knows nothing about teachers or losses. Simplified: vLLM must
run in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): tensors cannot be pickled to an engine
process and external_launcher requires it anyway.
"""

import contextlib
import functools
import hashlib
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
from torch.utils.checkpoint import checkpoint


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
    if not torch.cuda.is_available():
        # Seeded requests (request_seed) crash vLLM-CPU 0.32 when a prompt's prefill is split
        # over engine steps ("CPU Generator does not use offset": the discarded partial-
        # prefill sample is rewound by a CUDA-only generator offset). Prefill prompts whole.
        kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(8192, max_model_len or 0))
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
             pad_id=0, seed_key=None):
    """Sample `n` responses to every prompt (a list of token-id lists) on the local engine.

    `seed_key` (e.g. (seed, step, dp_rank)): every prompt's request gets its own seed
    from (seed_key, its index), so what is sampled does not depend on what the engine ran
    before (exact resume); None = the engine's own random stream.
    Returns a Rollout with len(prompts) * n rows; the n samples of a prompt are adjacent
    and share `group`."""
    from vllm.inputs import TokensPrompt

    kw = dict(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    params = (sampling_params(**kw) if seed_key is None else
              [sampling_params(**kw, seed=request_seed(*seed_key, i)) for i in range(len(prompts))])
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


def request_seed(*key):
    """A vLLM request seed from a key such as (seed, step, dp_rank, prompt index).

    A seeded request samples from its own generator, so the same key gives the same tokens
    whatever the engine ran before: a resumed run samples exactly what the uninterrupted
    one did. vLLM seeds the child i of an n > 1 request with seed + i (checked on vLLM
    0.32.0), so seeds of nearby prompts must not be consecutive integers (prompt 1's first
    child would be prompt 0's second): a hash spreads them over [0, 2**62), leaving room
    for the + i."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


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


# ----------------------------------------------------------------------------- log-probs

# Chunk size of `response_logp`: positions per chunk = max(1, LOGP_CHUNK_ELEMENTS // (B * V)),
# so one chunk's fp32 logits hold at most 2**26 elements (256 MiB; with Qwen3's 151,936-token
# vocabulary and one row, 441 positions) instead of the whole [B, R, V] (a 14k-token response:
# 8.5 GB, plus its copies). A toy vocabulary of a few hundred tokens is a single chunk.
LOGP_CHUNK_ELEMENTS = 2 ** 26

# Config keys of models whose forward changes the logits after the head (Gemma's final
# softcapping, Granite's logits_scaling, Cohere's logit_scale, ...): the swapped head would
# skip that step, so these models take the unchunked path. An unlisted model that does it
# too is caught at run time (see response_logp).
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logits_soft_cap", "logits_scaling",
                        "logit_scale", "output_multiplier")


def response_logp(model, batch, temperature=1.0, chunked=True, topk=0, kl_to=None):
    """Log-probability under `model` of every response token of `batch`: [B, R].

    The same function scores the student (with grad, at the sampling temperature) and the
    teachers (under no_grad, temperature 1), so both read the very token ids vLLM sampled.
    Only the last R+1 positions go through the LM head (prompts can be long), a chunk of
    positions at a time, so the full [B, R, V] fp32 logits never exist at once (under grad
    each chunk's logits are recomputed in backward). `chunked=False` is the plain path
    (for models that post-process their logits, and for comparison).

    Distribution-level KL (opd_kl_mode topk | full) asks for more per position, chunk by
    chunk: `topk` > 0 (teachers) adds the model's top-k log-probs, normalised over the
    whole vocabulary, and their ids: returns (logp, topk_logp [B, R, k], topk_ids [B, R, k]).
    `kl_to` (the student) is a function (log-probs [b, t, V] of a chunk, its slice of the R
    positions) -> [b, t, n] KL terms: returns (logp, kl [B, R, n])."""
    packed = response_scores(model, batch, temperature, chunked, topk, kl_to)
    if not topk and kl_to is None:
        return packed[..., 0]
    if topk:  # ids travel as floats in the packed tensor: exact below 2**24
        return packed[..., 0], packed[..., 1:1 + topk], packed[..., 1 + topk:].long()
    return packed[..., 0], packed[..., 1:]


def response_scores(model, batch, temperature=1.0, chunked=True, topk=0, kl_to=None):
    """What response_logp returns, packed in one fp32 tensor [B, R, 1 (+ 2k) (+ n)] (see
    _scores): the layout teachers.score moves between rank groups as it is."""
    targets = batch.input_ids[:, batch.prompt_len:]
    R = targets.shape[1]
    score = functools.partial(_scores, targets=targets, temperature=temperature, topk=topk, kl_to=kl_to)
    if not chunked or not _can_chunk(model):
        return score(_forward(model, batch, R + 1).logits[:, :-1], slice(0, R))
    with _head_returns_scores(model, score) as seen:
        packed = _forward(model, batch, R + 1).logits
    if seen["calls"] != 1 or packed is not seen["out"]:
        raise RuntimeError(
            f"{type(model).__name__}'s forward does not return its output head's result as is "
            "(post-processed logits?): add its config key to rollout.LOGIT_POSTPROCESSING")
    return packed


def _forward(model, batch, keep):
    # use_cache=False: transformers would otherwise build a KV cache of the whole batch
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids, logits_to_keep=keep, use_cache=False)


def _scores(logits, sl, *, targets, temperature, topk, kl_to):
    """What response_logp returns for the positions `sl`, packed in one fp32 tensor
    [b, t, 1 (+ 2k) (+ n)]: one tensor, so the swapped head returns what the model's forward
    expects and FSDP2's hooks see a plain output."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # fp32 or wider
    lse = logits.logsumexp(-1, keepdim=True)
    # logsumexp + gather instead of a full log_softmax: one [..., V] buffer fewer (sampled mode)
    parts = [logits.gather(-1, targets[:, sl].unsqueeze(-1)) - lse]
    if topk or kl_to is not None:
        logp = logits - lse
        if topk:
            values, ids = logp.topk(topk, -1)
            parts += [values, ids.float()]
        if kl_to is not None:
            parts.append(kl_to(logp, sl))
    return torch.cat(parts, -1)


def _can_chunk(model):
    """Whether the output head may be swapped: there is one with a weight, and the
    forward does not post-process its logits (LOGIT_POSTPROCESSING)."""
    head = model.get_output_embeddings()
    cfg = model.config.get_text_config()
    return (getattr(head, "weight", None) is not None
            and all(getattr(cfg, key, None) is None for key in LOGIT_POSTPROCESSING))


@contextlib.contextmanager
def _head_returns_scores(model, score):
    """Within it, the model's output head, called on the hidden states of the last R+1
    positions, returns `score(logits, positions)` of the first R (see _scores) instead of
    the logits, a chunk of positions at a time.

    Why swap the head instead of running `model.model(...)` and applying the head after
    it: the head must run inside the root module's forward. FSDP2 gathers the root's
    parameters (embedding, final norm, head) in the root's pre-forward hook and registers
    its pre-backward hooks on the root's outputs; outside it they may be resharded.
    Relies on the head being called once, on the hidden states, and its output returned
    as `.logits` unchanged: checked against transformers 5.19 (Llama, Qwen3: `logits =
    self.lm_head(hidden_states[:, slice_indices, :])`) and torch 2.13; response_logp
    checks both on every call. `seen` records the calls and the output for that."""
    head = model.get_output_embeddings()
    saved = vars(head).get("forward")  # an instance forward (accelerate's hooks); usually None
    plain = head.forward  # bound: reads head.weight when called
    seen = {"calls": 0, "out": None}

    def forward(hidden):
        seen["calls"] += 1
        # position j predicts token j+1: the last kept position predicts past the end
        seen["out"] = _chunked(plain, head.weight.shape[0], hidden[:, :-1], score)
        return seen["out"]

    head.forward = forward  # an instance attribute shadows the class's forward
    try:
        yield seen
    finally:  # restored even if the forward raised
        if saved is None:
            del head.forward
        else:
            head.forward = saved


def _chunked(head, vocab, hidden, score):
    """score(head(hidden[:, sl]), sl) over chunks `sl` of the positions, concatenated."""
    B, T = hidden.shape[:2]
    step = max(1, LOGP_CHUNK_ELEMENTS // max(1, B * vocab))
    if step >= T:  # one chunk (toy vocabularies): the plain computation, nothing recomputed
        return _head_scores(head, hidden, slice(0, T), score)
    # Under grad, each chunk is checkpointed: its logits are freed after the forward and
    # recomputed from its hidden states in backward, one chunk at a time. Non-reentrant:
    # works with FSDP2's hooks. The recompute reads the head's weight in backward, when
    # FSDP2 has it gathered (torch 2.13: the root never reshards after forward, and its
    # pre-backward hook on our output would gather it first). No RNG here to preserve.
    run = _head_scores
    if torch.is_grad_enabled():
        run = lambda *a: checkpoint(_head_scores, *a, use_reentrant=False, preserve_rng_state=False)
    parts = [run(head, hidden[:, a:a + step], slice(a, min(a + step, T)), score) for a in range(0, T, step)]
    return torch.cat(parts, 1)  # a new tensor, not a view (FSDP2 warns on view outputs)


def _head_scores(head, hidden, sl, score):
    return score(head(hidden), sl)
