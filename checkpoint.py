"""Checkpoints: an HF export to use, and the state to resume a run exactly.

`checkpoints/step_N/` holds
  * the student in HF format (config + safetensors + tokenizer), loadable by transformers
    and vLLM as-is (gathered on rank 0);
  * `state/`: model and AdamW state written with torch.distributed.checkpoint (DCP), each
    rank its own shards, so no rank ever gathers the optimizer;
  * `rank<R>.pt`: what differs per rank: RNG states and the data position;
  * `trainer_state.json`: step, world size, the lr scheduler, running totals, the model's
    parameter shapes (to refuse another model), written last.

A save is written under `step_N.tmp` and renamed when every rank has finished, then the
`latest` pointer is replaced (also by rename), then checkpoints beyond `save_total_limit`
are removed: a crash mid-save never leaves a partial step_N, nor a `latest` that points to
one. Sampling needs no state: every vLLM request is seeded from (seed, step, prompt,
sample), see rollout.request_seed.

Also the run's directory (`prepare_output_dir`: resume or start fresh, never clobber an
earlier run by accident), the running totals a resume restores (`Progress`), and the
policy for steps skipped on non-finite numbers (`check_skips`).

Simplified: all ranks write to one directory (a shared filesystem across nodes); resuming
needs the same world size (the per-rank data and RNG states assume it).
"""

import dataclasses
import datetime
import json
import os
import random
import shutil
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import logs
import rollout
from config import ConfigError
from logs import banner


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed (the message names what differs)."""


def prepare_output_dir(cfg, rank):
    """The output dir of a run: fill in output_dir's {time}, find the checkpoint to resume from (rank 0 decides, so
    all ranks agree), refuse to clobber an earlier run, and write the resolved config.
    Returns the checkpoint path or None (a fresh start)."""
    decided = [datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), None, None]  # stamp, checkpoint, error
    if rank == 0:
        try:
            decided[1] = resolve(cfg.resume_from_checkpoint,
                                            cfg.output_dir.replace("{time}", decided[0]))
        except ResumeError as e:
            decided[2] = str(e)
    dist.broadcast_object_list(decided, src=0)  # start-up only; not on the hot path
    stamp, resume, error = decided
    if error:
        raise ResumeError(error)
    cfg.output_dir = cfg.output_dir.replace("{time}", stamp)
    earlier = os.path.exists(os.path.join(cfg.output_dir, "metrics.jsonl"))
    if earlier and resume is None and not cfg.overwrite_output_dir and cfg.resume_from_checkpoint != "auto":
        raise ConfigError(
            f"output_dir: {cfg.output_dir} already holds a run (metrics.jsonl); choose another --output_dir, "
            "pass --overwrite_output_dir, or --resume_from_checkpoint auto|PATH")
    dist.barrier()  # every rank has checked before rank 0 writes anything
    if rank == 0:
        import yaml

        os.makedirs(cfg.output_dir, exist_ok=True)
        if resume is None and os.path.exists(os.path.join(cfg.output_dir, "checkpoints", "latest")):
            os.remove(os.path.join(cfg.output_dir, "checkpoints", "latest"))  # never `auto` into the old run
        # a resumed run keeps the first run's config.yaml and writes its own beside it
        name = "config.yaml" if resume is None else f"config.resume-{os.path.basename(resume)}.yaml"
        with open(os.path.join(cfg.output_dir, name), "w") as f:
            yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    logs.library_log_to(cfg.output_dir, rank)  # library output from here on (unless --verbose)
    if earlier and resume is None:
        banner(f"{cfg.output_dir}: no checkpoint to resume from; starting fresh (its metrics are replaced)")
    return resume


def save(path, *, model, opt, sched, tokenizer, trainer_state, rank_state, save_total_limit=0):
    """Write checkpoint `path` (…/checkpoints/step_N) from every rank, atomically."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    rank, tmp = dist.get_rank(), path + ".tmp"
    if rank == 0 and os.path.exists(tmp):  # left by a save that crashed
        shutil.rmtree(tmp)
    dist.barrier()
    export_hf(model, tokenizer, tmp)
    # sharded (DTensor) views, nothing gathered. No AdamW state before the first optimizer
    # step (every step so far skipped): get_state_dict would create it with a fake lr=0
    # step, which advances AdamW's step counter in the live run, so save the model alone.
    has_optim = bool(opt.state)
    sd = dict(zip(("model", "optim"), get_state_dict(model, opt))) if has_optim else {
        "model": get_model_state_dict(model)}
    dcp.save(sd, checkpoint_id=os.path.join(tmp, "state"))
    torch.save({**rank_state, "rng": rng_states()}, os.path.join(tmp, f"rank{rank}.pt"))
    dist.barrier()  # every rank's files are written before the save is committed
    if rank == 0:
        state = {**trainer_state, "world_size": dist.get_world_size(), "scheduler": sched.state_dict(),
                 "has_optimizer_state": has_optim, "param_shapes": param_shapes(model)}
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=1)
        old = path + ".old"
        if os.path.exists(path):  # the same step saved twice: the newer one wins; moved
            os.replace(path, old)  # aside, not deleted, until the new one is in place
        os.replace(tmp, path)
        _write_latest(os.path.dirname(path), os.path.basename(path))
        shutil.rmtree(old, ignore_errors=True)
        if save_total_limit:
            prune(os.path.dirname(path), save_total_limit)
    dist.barrier()


def export_hf(model, tokenizer, path):
    """The student in HF format under `path` (rank 0 writes; all ranks take part in the gather)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        model.save_pretrained(path, state_dict=state)
        tokenizer.save_pretrained(path)


def _write_latest(ckpt_dir, name):
    with open(os.path.join(ckpt_dir, "latest.tmp"), "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it the pointer
    os.replace(os.path.join(ckpt_dir, "latest.tmp"), os.path.join(ckpt_dir, "latest"))


def steps_saved(ckpt_dir):
    """Complete checkpoints in `ckpt_dir`, oldest first, as (step, path)."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [(int(d[5:]), os.path.join(ckpt_dir, d)) for d in os.listdir(ckpt_dir)
             if d.startswith("step_") and d[5:].isdigit()]
    return sorted(found)


def prune(ckpt_dir, keep):
    """Remove all but the newest `keep` checkpoints (never the one `latest` names)."""
    latest = find_latest(ckpt_dir)
    for _, path in steps_saved(ckpt_dir)[:-keep]:
        if path != latest:
            shutil.rmtree(path)


def find_latest(ckpt_dir):
    """The checkpoint the `latest` pointer names, or None."""
    try:
        with open(os.path.join(ckpt_dir, "latest")) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    return os.path.join(ckpt_dir, name) if name else None


def resolve(resume_from_checkpoint, output_dir):
    """The checkpoint to resume from: `auto` = output_dir's latest (None if there is none:
    a fresh start), else the given path, which must be a complete checkpoint."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "auto":
        path = find_latest(os.path.join(output_dir, "checkpoints"))
        if path is None:
            return None
    else:
        path = resume_from_checkpoint.rstrip("/")
    check_complete(path)
    return path


def check_complete(path):
    where = f"resume_from_checkpoint: {path}"
    if path.endswith(".tmp"):
        raise ResumeError(f"{where} is a save that never finished (a .tmp directory)")
    if not os.path.isdir(path):
        raise ResumeError(f"{where} does not exist")
    needed = ["trainer_state.json", os.path.join("state", ".metadata"), "config.json"]
    missing = [n for n in needed if not os.path.exists(os.path.join(path, n))]
    if missing:
        raise ResumeError(f"{where} is not a complete checkpoint: missing {', '.join(missing)}")


def load(path, *, model, opt, sched):
    """Restore model, optimizer and scheduler from `path` (after check_complete). Returns
    (trainer_state, this rank's state: RNG and data position, for the caller to restore). Raises ResumeError if `path` was written by another
    world size or for another model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)

    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if state["world_size"] != dist.get_world_size():
        raise ResumeError(f"resume_from_checkpoint: {path} was written by {state['world_size']} rank(s), "
                          f"this run has {dist.get_world_size()}; resume with the same number of ranks")
    _check_same_model(path, state["param_shapes"], param_shapes(model))
    missing = [f"rank{r}.pt" for r in range(dist.get_world_size())  # every rank checks all:
               if not os.path.exists(os.path.join(path, f"rank{r}.pt"))]  # all stop together
    if missing:
        raise ResumeError(f"resume_from_checkpoint: {path} is not a complete checkpoint: missing {', '.join(missing)}")
    state_dir = os.path.join(path, "state")  # each rank reads its own shards
    if state["has_optimizer_state"]:
        sd = dict(zip(("model", "optim"), get_state_dict(model, opt)))
        dcp.load(sd, checkpoint_id=state_dir)
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    else:  # saved before any optimizer step: AdamW starts empty, as it did then
        sd = {"model": get_model_state_dict(model)}
        dcp.load(sd, checkpoint_id=state_dir)
        set_model_state_dict(model, sd["model"])
    sched.load_state_dict(state["scheduler"])
    return state, torch.load(os.path.join(path, f"rank{dist.get_rank()}.pt"), weights_only=False)


def _check_same_model(path, saved, here):
    if saved == here:
        return
    for name in sorted(set(saved) | set(here)):
        if saved.get(name) != here.get(name):
            raise ResumeError(
                f"resume_from_checkpoint: {path} was written for another model: parameter '{name}' has "
                f"shape {saved.get(name, 'none')} there and {here.get(name, 'none')} here (check pretrain)")


def param_shapes(model):
    return {n: list(p.shape) for n, p in model.named_parameters()}  # global shapes (DTensor)


def rng_states():
    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_states(s):
    import numpy as np

    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


# ----------------------------------------------------------------------------------------
# The run's progress: the running totals a resume restores, with the model's state


@dataclass
class Progress:
    step: int = 0              # the last step done
    elapsed: float = 0.0       # training seconds so far (validation excluded)
    tokens_total: float = 0.0  # tokens trained on so far
    skipped_steps: int = 0     # steps skipped for non-finite numbers
    consecutive_skips: int = 0
    first: dict = field(default_factory=dict)  # validation before training (for the final summary)

    def advance(self, step, seconds, tokens, skipped):
        self.step, self.elapsed, self.tokens_total = step, self.elapsed + seconds, self.tokens_total + tokens
        self.skipped_steps += bool(skipped)
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0


def save_run(path, run, model, opt, sched, tokenizer, src, save_total_limit=0):
    """`save` with the run's Progress and this rank's data position (`src`: sources.py)."""
    save(path, model=model, opt=opt, sched=sched, tokenizer=tokenizer, trainer_state=dataclasses.asdict(run),
         rank_state={"data": src.state_dict()}, save_total_limit=save_total_limit)


def resume_run(path, model, opt, sched, src, llm, infer_dtype):
    """Continue from checkpoint `path`: weights, AdamW, lr schedule, data position, RNG and
    Progress; then the engine, which still holds `pretrain`'s weights, gets the trainer's
    before the first rollout (a resumed run must not sample from the initial model)."""
    state, rank_state = load(path, model=model, opt=opt, sched=sched)
    src.load_state_dict(rank_state["data"])
    rollout.sync_weights(llm, model, infer_dtype)
    banner(f"resumed from {path} (step {state['step']})")
    set_rng_states(rank_state["rng"])  # last: nothing may draw from them before the next step
    return Progress(**{f.name: state[f.name] for f in dataclasses.fields(Progress)})


class TrainingError(RuntimeError):
    """The run cannot go on (the message says why and what is kept)."""


def check_skips(run, skipped, max_consecutive_skips, output_dir):
    """Say why a step was skipped (student.skip_reasons); stop the run after
    `max_consecutive_skips` in a row, naming the last good checkpoint."""
    if not skipped:
        return
    banner(f"step {run.step}: optimizer step skipped ({', '.join(skipped)}); weights unchanged, "
           f"{run.consecutive_skips} in a row")
    if max_consecutive_skips and run.consecutive_skips >= max_consecutive_skips:
        last = find_latest(os.path.join(output_dir, "checkpoints"))
        raise TrainingError(f"{run.consecutive_skips} steps in a row had non-finite numbers ({', '.join(skipped)}; "
                            f"max_consecutive_skips={max_consecutive_skips}); stopping. The last good "
                            f"checkpoint is {last or 'none (no checkpoint was saved)'}")
