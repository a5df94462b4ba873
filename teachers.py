"""Teachers: forward-only models that score every token the student sampled.

Owns
  * `load_teacher`  read a teacher from disk, check that it speaks the student's
                    vocabulary, and shard it with FSDP2 over its rank group.
  * `routes`        which samples a teacher scores: by the sample's `tag`
                    (`tag_included` empty = a general teacher that scores everything).
  * `score`         every teacher's logprob of every sampled response token, plus the
                    routed mask per teacher, in the layout `loss.opd_advantages` takes.
  * `generate`      the teacher's own answers: greedy for its validation accuracy, sampled
                    for the off-policy distillation baseline.

Knows nothing about optimizers. Each teacher lives on its own group of ranks
(`device_mapping`); teachers on disjoint groups score at the same time, teachers sharing
ranks score in turn on them. Simplified: samples reach a sub-group teacher through one
world-wide all-gather of the whole batch (simple, tensor-only; not the minimal traffic).
"""

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import loading
from rollout import Rollout, collate, response_scores


class TeacherError(ValueError):
    """A teacher that cannot be used with this student (raised at start-up)."""


@dataclass
class Teacher:
    name: str
    model: torch.nn.Module = None  # None on the ranks that do not hold this teacher
    coef: float = 1.0             # opd_kl_coef: weight of this teacher's KL in the advantage
    tag_included: list = field(default_factory=list)  # empty = every tag
    micro_batch_size: int = 8
    ranks: list = None            # global ranks that hold it (device_mapping); None = all
    group: object = None          # their process group

    def routes(self, tags):
        """Bool tensor [B]: which of these samples this teacher scores."""
        return torch.tensor([not self.tag_included or t in self.tag_included for t in tags])

    @property
    def everywhere(self):
        return self.ranks is None or len(self.ranks) == dist.get_world_size()


def check_vocab(student_path, teacher_path, name, same_logits=False):
    """Refuse a teacher whose token ids mean something else than the student's.

    OPD compares the two models' logprobs of the *same token ids*; a different tokenizer
    silently turns the KL into noise, so this is an error, not a warning."""
    from transformers import AutoConfig, AutoTokenizer

    s_tok = AutoTokenizer.from_pretrained(student_path)
    try:
        t_tok = AutoTokenizer.from_pretrained(teacher_path)
    except (OSError, ValueError):
        t_tok = None  # a teacher saved without tokenizer files: fall back to sizes below
    if t_tok is not None:
        s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
        if s_vocab != t_vocab:
            diff = sorted(set(s_vocab.items()) ^ set(t_vocab.items()), key=lambda kv: kv[1])[:3]
            raise TeacherError(
                f"teacher '{name}' ({teacher_path}) has a different vocabulary than the student: "
                f"{len(t_vocab)} vs {len(s_vocab)} tokens, e.g. {diff}. OPD needs the teacher and "
                "student to share a tokenizer.")
    t_size = AutoConfig.from_pretrained(teacher_path).vocab_size
    s_size = AutoConfig.from_pretrained(student_path).vocab_size
    if same_logits and t_size != s_size:  # a distribution-level KL compares logit by logit
        raise TeacherError(f"teacher '{name}' ({teacher_path}) has {t_size} output logits and the student "
                           f"{s_size}: opd_kl_mode topk | full needs the same number")
    if t_size < len(s_tok):
        raise TeacherError(
            f"teacher '{name}' ({teacher_path}) has {t_size} output logits but the student's "
            f"tokenizer has {len(s_tok)} tokens")


def load_teacher(name, path, *, device, dtype, ranks=None, attn_implementation="sdpa", **kw):
    """Load a teacher on the ranks in `ranks` (its device_mapping; None = all) and shard
    it with FSDP2 over them. Every rank must call this (creating the group is
    collective); the others get a Teacher without a model and never read the weights."""
    from torch.distributed.device_mesh import DeviceMesh

    ranks = sorted(ranks) if ranks else list(range(dist.get_world_size()))
    group = dist.group.WORLD if len(ranks) == dist.get_world_size() else dist.new_group(ranks)
    if dist.get_rank() not in ranks:
        return Teacher(name=name, ranks=ranks, group=group, **kw)
    mesh = DeviceMesh.from_group(group, device_type=torch.device(device).type)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)

    def shard(model):
        model.eval().requires_grad_(False)
        # Forward only: reshard after every block so at most one block is ever gathered.
        for block in model.model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)

    # each member reads only its own shards from disk (loading.py): the host and the
    # device only ever hold this rank's part of the teacher
    model = loading.build_sharded(path, dtype=dtype, shard=shard, device=device,
                                  attn_implementation=attn_implementation)
    return Teacher(name=name, model=model, ranks=ranks, group=group, **kw)


@torch.no_grad()  # not inference_mode: FSDP2 on a 1-rank mesh fails under it
def score(teachers, batch, tag_ids, topk=0):
    """Score `batch` (this rank's Rollout, on the model's device) with every teacher.

    Returns (teacher_logps, routed, seconds, teacher_topk): dicts name -> [B, R] logprobs
    (0 where not routed), name -> bool [B], name -> this rank's forward time (0 if it does
    not hold the teacher), and with `topk` > 0 name -> (the teacher's top-k log-probs
    [B, R, k], their ids [B, R, k]) for a distribution-level KL (else {}). A teacher on all ranks scores each rank's own samples in place.
    A teacher on a subset of ranks needs the samples moved: every rank's batch is
    all-gathered once (tensors only; tags travel as ids from `tag_ids`), each member of
    the teacher's group scores its share of the routed samples, and a sum all-reduce
    hands every owner its rows back. Teachers on disjoint groups thus run at the same
    time; a rank holding several runs them in turn."""
    everyone, moved = None, {}
    packed, routed, seconds = {}, {}, {}  # per teacher [B, R, 1 + 2k]: logp (+ top-k values, ids)
    width = lambda b: (*b.rollout_logp.shape, 1 + 2 * topk)
    for t in teachers:  # 1. each rank runs the teachers it holds, in config order
        routed[t.name] = t.routes(batch.tags).to(batch.input_ids.device)
        t0 = time.perf_counter()
        if t.everywhere:
            packed[t.name] = batch.rollout_logp.new_zeros(width(batch))
            _forward_rows(t, batch, routed[t.name].nonzero().squeeze(-1), packed[t.name], topk)
        else:
            everyone = everyone or _all_gather_batch(batch, tag_ids)
            all_batch, all_tags = everyone
            moved[t.name] = all_batch.rollout_logp.new_zeros(width(all_batch))
            if t.model is not None:
                idx = t.routes(all_tags).to(batch.input_ids.device).nonzero().squeeze(-1)
                share = idx.tensor_split(len(t.ranks))[t.ranks.index(dist.get_rank())]
                _forward_rows(t, all_batch, share, moved[t.name], topk)
        seconds[t.name] = time.perf_counter() - t0 if t.model is not None else 0.0
    if moved:  # 2. one sum all-reduce (non-members add zeros) returns every owner its rows;
        # only now do ranks wait on each other, so disjoint groups ran at the same time
        results = torch.stack(list(moved.values()))  # top-k: [N, k] values + ids, not logits
        dist.all_reduce(results)
        B, R = batch.rollout_logp.shape
        for name, out in zip(moved, results):
            packed[name] = out[dist.get_rank() * B:(dist.get_rank() + 1) * B, :R]
    logps = {t.name: packed[t.name][..., 0] * routed[t.name][:, None] for t in teachers}
    top = {t.name: (packed[t.name][..., 1:1 + topk], packed[t.name][..., 1 + topk:].long())
           for t in teachers} if topk else {}
    return logps, routed, seconds, top


def _forward_rows(t, batch, idx, out, topk=0):
    """out[idx] = the teacher's logprobs of those rows (and top-k log-probs and ids, packed
    as in `score`), in micro-batches; every rank of the teacher's group runs the same number
    of forwards (FSDP2 gathers are collectives), padding with a dummy one-token forward
    where a rank has fewer."""
    n_micro = torch.tensor(math.ceil(len(idx) / t.micro_batch_size), device=out.device)
    dist.all_reduce(n_micro, op=dist.ReduceOp.MAX, group=t.group)
    for i in range(int(n_micro)):
        mb_idx = idx[i * t.micro_batch_size:(i + 1) * t.micro_batch_size]
        if len(mb_idx):
            out[mb_idx] = response_scores(t.model, batch.select(mb_idx), topk=topk)
        else:
            t.model(input_ids=batch.input_ids[:1, :1])


def _all_gather_batch(batch, tag_ids):
    """Every rank's Rollout, concatenated in rank order, padded to common lengths.

    All ranks hold the same number of samples (equal shares of the global batch); prompt
    and response lengths differ, so they are padded to the longest first."""
    dev = batch.input_ids.device
    R, P = batch.response_mask.shape[1], batch.prompt_len
    sizes = torch.tensor([P, R], device=dev)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    Pm, Rm = sizes.tolist()
    pad = lambda x, left, right: torch.nn.functional.pad(x, (left, right))
    ids = pad(batch.input_ids, Pm - P, Rm - R)
    attn = pad(batch.attention_mask, Pm - P, Rm - R)
    tags = torch.tensor([tag_ids[t] for t in batch.tags], device=dev)
    flat = torch.cat([ids, attn, tags[:, None]], 1)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    flat = torch.cat(gathered)
    L = Pm + Rm
    names = {i: t for t, i in tag_ids.items()}
    all_tags = [names[i] for i in flat[:, -1].tolist()]
    resp_mask = flat[:, L + Pm:2 * L].float()
    all_batch = Rollout(flat[:, :L], flat[:, L:2 * L], resp_mask, torch.zeros_like(resp_mask), Pm,
                        torch.zeros(len(flat), dtype=torch.long, device=dev), all_tags)
    return all_batch, all_tags


@torch.no_grad()
def generate(t, prompts, *, max_tokens, eos_id, pad_id, device, temperature=0.0):
    """The teacher's answers (token id lists, eos included) to `prompts`, this rank's share.

    temperature 0 = greedy. Every member of the teacher's group must call it (with its
    own share, possibly empty). Each micro-batch runs exactly max_tokens forwards with a
    KV cache and no early exit, and ranks with fewer micro-batches decode a dummy prompt,
    so the FSDP2 gathers line up across the group. Simplified: plain argmax / softmax
    sampling from the torch RNG, no top-p; not HF `generate` (whose early stop would
    desynchronise the group)."""
    from transformers import DynamicCache

    n_micro = torch.tensor(math.ceil(len(prompts) / t.micro_batch_size), device=device)
    dist.all_reduce(n_micro, op=dist.ReduceOp.MAX, group=t.group)
    answers = []
    for i in range(int(n_micro)):
        real = prompts[i * t.micro_batch_size:(i + 1) * t.micro_batch_size]
        mb = real or [[pad_id]]
        width = max(len(p) for p in mb)
        ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in mb], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in mb], device=device)
        pos, cache = (mask.cumsum(-1) - 1).clamp(min=0), DynamicCache()
        done = torch.zeros(len(mb), dtype=torch.bool, device=device)
        out = []
        for _ in range(max_tokens):
            logits = t.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                             past_key_values=cache, use_cache=True).logits[:, -1].float()
            nxt = (logits.argmax(-1) if temperature == 0 else
                   torch.multinomial(torch.softmax(logits / temperature, -1), 1)[:, 0])
            ids = torch.where(done, pad_id, nxt)[:, None]
            out.append(ids)
            done |= ids[:, 0] == eos_id
            mask = torch.cat([mask, torch.ones_like(ids)], 1)
            pos = pos[:, -1:] + 1
        if real:
            for row in torch.cat(out, 1).tolist():
                answers.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
    return answers


def teacher_rollout(t, prompts, tags, *, n, max_tokens, temperature, eos_id, pad_id, device):
    """A Rollout batch written by the teacher (`n` answers per prompt): the data of the
    off-policy distillation baseline. Its rollout_logp is 0 (unused: SFT has no ratio)."""
    rows = [p for p in prompts for _ in range(n)]
    answers = generate(t, rows, max_tokens=max_tokens, eos_id=eos_id, pad_id=pad_id, device=device,
                       temperature=temperature)
    return collate([torch.tensor(r) for r in rows], [torch.tensor(a) for a in answers],
                   [torch.zeros(len(a)) for a in answers], torch.arange(len(prompts)).repeat_interleave(n),
                   [tag for tag in tags for _ in range(n)], pad_id)
