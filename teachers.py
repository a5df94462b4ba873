"""Teachers: forward-only models that score every token the student sampled.

Owns
  * `load_teacher`  read a teacher from disk, check that it speaks the student's
                    vocabulary, and shard it with FSDP2 over its rank group.
  * `routes`        which samples a teacher scores: by the sample's `tag`
                    (`tag_included` empty = a general teacher that scores everything).
  * `score`         every teacher's logprob of every sampled response token, plus the
                    routed mask per teacher, in the layout `loss.opd_advantages` takes.

Knows nothing about optimizers. Simplified (for now): every teacher is sharded over all
ranks, so each rank scores its own samples locally and several teachers score in turn.
Teachers on their own rank groups (scoring in parallel, samples moved between groups)
come with multi-teacher placement; the FSDP2 group is already a parameter here.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from rollout import response_logp


class TeacherError(ValueError):
    """A teacher that cannot be used with this student (raised at start-up)."""


@dataclass
class Teacher:
    name: str
    model: torch.nn.Module
    coef: float = 1.0             # opd_kl_coef: weight of this teacher's KL in the advantage
    tag_included: list = field(default_factory=list)  # empty = every tag
    micro_batch_size: int = 8
    group: object = None          # process group of the ranks that hold the teacher

    def routes(self, tags):
        """Bool tensor [B]: which of these samples this teacher scores."""
        return torch.tensor([not self.tag_included or t in self.tag_included for t in tags])


def check_vocab(student_path, teacher_path, name):
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
    if t_size < len(s_tok):
        raise TeacherError(
            f"teacher '{name}' ({teacher_path}) has {t_size} output logits but the student's "
            f"tokenizer has {len(s_tok)} tokens")


def load_teacher(name, path, *, device, dtype, group=None, attn_implementation="sdpa", **kw):
    """Load a teacher and shard it with FSDP2 over `group` (default: all ranks)."""
    from torch.distributed.device_mesh import DeviceMesh
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    model.eval().requires_grad_(False)
    group = group or dist.group.WORLD
    mesh = DeviceMesh.from_group(group, device_type=torch.device(device).type)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    # Forward only: reshard after every block so at most one block is ever gathered.
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    model.to(device)  # after sharding: the device only ever holds this rank's shard
    return Teacher(name=name, model=model, group=group, **kw)


@torch.no_grad()  # not inference_mode: FSDP2 on a 1-rank mesh fails under it
def score(teachers, batch):
    """Score `batch` (a Rollout on the model's device) with every teacher.

    Returns (teacher_logps, routed): dicts name -> [B, R] logprobs (0 where not routed)
    and name -> bool [B]. A teacher runs forward only on the samples routed to it; all
    ranks of its group run the same number of micro-batches (FSDP2 gathers are
    collectives), padding with a dummy one-token forward where a rank has fewer."""
    teacher_logps, routed = {}, {}
    for t in teachers:
        mask = t.routes(batch.tags).to(batch.input_ids.device)
        idx = mask.nonzero().squeeze(-1)
        out = torch.zeros_like(batch.rollout_logp)
        n_micro = torch.tensor(math.ceil(len(idx) / t.micro_batch_size),
                               device=batch.input_ids.device)
        dist.all_reduce(n_micro, op=dist.ReduceOp.MAX, group=t.group)
        for i in range(int(n_micro)):
            mb_idx = idx[i * t.micro_batch_size:(i + 1) * t.micro_batch_size]
            if len(mb_idx):
                out[mb_idx] = response_logp(t.model, batch.select(mb_idx))
            else:
                t.model(input_ids=batch.input_ids[:1, :1])  # keep the group's collectives in step
        teacher_logps[t.name], routed[t.name] = out, mask
    return teacher_logps, routed
