"""On-Policy Distillation (OPD): the training script.

The student samples answers with a colocated vLLM engine, the teacher scores every sampled
token, the advantage is the negative reverse KL per token (teacher_logp - student_logp),
and the student takes an importance-sampled policy-gradient step with FSDP2. Then the new
weights are streamed into vLLM and the next step samples from them.

    python opd.py                                     # CPU default: the toy world, 1 rank
    torchrun --nproc_per_node=2 opd.py                # the same on 2 ranks
    torchrun --nproc_per_node=8 opd.py --config configs/qwen3_32b_to_8b.yaml
    python opd.py --max_steps 5 --output_dir runs/x --student_train.lr 1e-4
    python opd.py --help                              # every field, with its docstring
    torchrun --nproc_per_node=2 opd.py --config configs/agentic_toy.yaml   # multi-turn games

This file owns the config schema, distributed init, building the pieces, and the step
loop (rollout -> rewards -> teacher -> loss + FSDP2 step -> weight sync -> log, validate,
checkpoint); logs.py writes what it logs. With pure_opd_pipeline_type=agentic the rollout
is multi-turn episodes in environments (agent.py) and their reward is the env's.
Not a framework: fork it.
"""

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch
import torch.distributed as dist

import rollout  # noqa: I001  first: sets the vLLM environment before vLLM is imported
import agent
import checkpoint
import config
import data
import loading
import student as student_lib
import teachers as teachers_lib
import toy
import sources
import toy_agentic
import toy_long
import validation
import logs
from logs import Logger, banner, progress_line, step_metrics
from loss import rl_advantages

# ----------------------------------------------------------------------------------------
# Config. Every field's docstring is its --help text. Key names follow the seed (ROLL).


@dataclass
class StudentTrain:
    lr: float = 2e-3
    """AdamW learning rate of the student."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Linear learning-rate warm-up over this many steps."""
    lr_scheduler_type: Literal["constant", "cosine"] = "cosine"
    """After warm-up: constant, or cosine decay to 10% of lr at max_steps."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    micro_batch_size: int = 128
    """Sequences per forward/backward on one rank; gradients accumulate over a step
    (the default suits the toy models; billion-parameter students want 1-4)."""
    dtype: str = "float32"
    """Compute dtype of forward/backward (float32 | bfloat16). Master weights stay fp32."""
    attn_implementation: str = "sdpa"
    """transformers attention kernel: sdpa | eager | flash_attention_2 (GPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    clip: Optional[float] = 0.2
    """PPO clip range of the importance ratio; None = plain importance sampling."""
    is_level: Literal["token", "seq"] = "token"
    """Importance ratio per token, or one per sequence (geometric mean)."""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    """How per-token losses are averaged over the global batch."""


@dataclass
class StudentInfer:
    dtype: str = "float32"
    """vLLM dtype (float32 | bfloat16). Passed explicitly: vLLM-CPU would pick bf16."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism across ranks (external_launcher); 1 = every rank a replica."""
    temperature: float = 1.0
    """Sampling temperature (the trainer scores with the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling; below 1 the sampler's logprobs no longer match the trainer's."""
    top_k: int = -1
    """Top-k sampling (-1 = off); same caveat as top_p."""
    gpu_memory_utilization: float = 0.4
    """Share of GPU memory vLLM may take (GPU only)."""
    kv_cache_gib: int = 1
    """KV-cache size in GiB (CPU only: VLLM_CPU_KVCACHE_SPACE)."""
    enforce_eager: bool = True
    """Skip torch.compile / CUDA graphs in vLLM: faster start, slower decode."""
    sleep: bool = True
    """Free vLLM's memory while training, where the platform supports it (GPU)."""


@dataclass
class TeacherConfig:
    model_name_or_path: str = os.path.join(toy.TOY_DIR, "teacher")
    """HF-format directory of the teacher (forward only, FSDP2); '' = no teacher (plain RL)."""
    opd_kl_coef: float = 1.0
    """Weight of this teacher's reverse KL in the advantage."""
    tag_included: list[str] = field(default_factory=list)
    """Tags of the samples this teacher scores; empty = all tags."""
    dtype: str = "float32"
    """Teacher compute dtype (float32 | bfloat16)."""
    micro_batch_size: int = 128
    """Sequences per teacher forward on one rank (toy default; big teachers want 1-8)."""
    device_mapping: list[int] = field(default_factory=list)
    """Global ranks that hold and run this teacher (FSDP2 over them); empty = all ranks."""


@dataclass
class Data:
    file_name: list[str] = field(default_factory=lambda: [os.path.join(toy.TOY_DIR, "train.jsonl")])
    """jsonl files in the seed format (id, source, difficulty, prompt, messages, tag, ...)."""


@dataclass
class RewardConfig:
    type: Literal["math_rule", "code_sandbox"] = "math_rule"
    """math_rule: \\boxed answer vs ground_truth (math-verify); code_sandbox: test_cases."""
    tag_included: list[str] = field(default_factory=list)
    """Tags this reward scores (also its domain for domain_interleave_probs); empty = all."""


@dataclass
class Validation:
    file_name: list[str] = field(default_factory=lambda: [os.path.join(toy.TOY_DIR, "val.jsonl")])
    """jsonl files to evaluate on; empty = none. (The toy split is only the default when
    training on the toy data.)"""
    eval_steps: int = 50
    """Evaluate before the first step, every N steps and after the last (0 = never)."""
    temperature: float = 0.0
    """Sampling temperature for validation (0 = greedy)."""
    num_examples: int = 3
    """Generations shown on the console and in TensorBoard text per evaluation."""
    teacher: bool = True
    """Also score each tag's teacher once, greedily, before training (val/<tag>/teacher_accuracy)."""


@dataclass
class EnvSpec:
    env_type: str = ""
    """Environment id (required): guess_number | nim (envs.py) | gem:<GEM id> (e.g.
    gem:game:GuessTheNumber-v0-hard)."""
    env_config: dict[str, Union[bool, int, float, str]] = field(default_factory=dict)
    """Keyword arguments of the environment, e.g. {low: 1, high: 50}."""
    max_turns: int = 8
    """Most actions per episode (ROLL: max_actions_per_traj)."""
    max_tokens_per_turn: int = 16
    """Most tokens sampled per action (ROLL: max_tokens_per_step)."""


@dataclass
class TrainEnvManager:
    tags: list[str] = field(default_factory=list)
    """custom_envs tags to play, in turn over each step's rollout_batch_size env seeds;
    empty = all of them."""


@dataclass
class ValEnvManager:
    tags: list[str] = field(default_factory=list)
    """custom_envs tags to validate on; empty = all of them."""
    num_env_groups: int = 64
    """Validation episodes per tag (one greedy episode per env seed)."""


@dataclass
class Config:
    config: Optional[str] = None
    """YAML preset to start from; flags given after it override its values."""
    pretrain: str = os.path.join(toy.TOY_DIR, "student")
    """HF-format directory of the initial student (for student_train and student_infer)."""
    teacher: dict[str, TeacherConfig] = field(default_factory=lambda: {"default": TeacherConfig()})
    """Teachers by name. YAML may give one teacher's fields directly (it is then named
    'default', and --teacher.<field> flags address it); {} = no teacher (plain RL)."""
    data: Data = field(default_factory=Data)
    pure_opd_pipeline_type: Literal["rlvr", "agentic"] = "rlvr"
    """rlvr: single-turn prompts from data files; agentic: multi-turn episodes in custom_envs."""
    custom_envs: dict[str, EnvSpec] = field(default_factory=dict)
    """Agentic: environments by tag (the tag routes episodes to teachers, like a sample tag)."""
    train_env_manager: TrainEnvManager = field(default_factory=TrainEnvManager)
    """Agentic: which envs training plays."""
    val_env_manager: ValEnvManager = field(default_factory=ValEnvManager)
    """Agentic: which envs validation plays, and how many episodes per tag."""
    student_train: StudentTrain = field(default_factory=StudentTrain)
    student_infer: StudentInfer = field(default_factory=StudentInfer)
    rollout_batch_size: int = 64
    """Prompts (agentic: env seeds) per step, global (split over data-parallel ranks)."""
    num_return_sequences_in_group: int = 4
    """Samples per prompt (agentic: episodes per env seed)."""
    prompt_length: int = 64
    """Longest prompt in tokens; longer prompts are skipped (counted and logged). Agentic:
    the longest first observation (a longer one is a start-up error)."""
    response_length: int = 16
    """Most tokens sampled per response. Agentic: the room after the first observation for
    all of an episode's actions and observations."""
    kl_estimator: Literal["k1", "k2", "k3", "abs"] = "k1"
    """Per-token reverse-KL estimator that becomes the (negative) advantage (opd_kl_mode sampled)."""
    opd_kl_mode: Literal["sampled", "topk", "full"] = "sampled"
    """sampled: the KL of the sampled token as the advantage (k1, as in the seed); topk: the
    KL of the student's whole distribution to the teacher's top-k (+ a rest bucket) as a
    loss term at every response position; full: the same over the whole vocabulary."""
    opd_kl_topk: int = 64
    """k of opd_kl_mode topk: teacher log-probs per position moved to the student."""
    rewards: dict[str, RewardConfig] = field(default_factory=lambda: {"math": RewardConfig()})
    """External rewards, name -> {type, tag_included}; a sample gets the sum of those
    whose tags include its tag. Pure OPD logs them only (reward/<tag>/mean). Not used in
    agentic mode: an episode's reward is its env's."""
    use_opd: bool = False
    """Mixed mode: advantage = RL advantage from the rewards - sum of teacher KL terms.
    With no teacher (teacher: {}) training is plain RL."""
    off_policy: bool = False
    """Baseline instead of OPD: the student is trained by SFT on the teacher's answers:
    those stored in the data (teacher_data.py samples them once, up front, with vLLM),
    else the teacher decodes each step's (sampled at student_infer.temperature)."""
    adv_estimator: Literal["grpo", "reinforce"] = "grpo"
    """RL advantage from rewards (mixed mode, plain RL): group-normalised or raw."""
    global_template: str = "native"
    """Chat template for every tag: native (the tokenizer's) | qwen3 | qwen3_nothink."""
    tag_to_template: dict[str, str] = field(default_factory=dict)
    """Per-tag template overriding global_template, e.g. {code: qwen3_nothink}."""
    domain_interleave_probs: dict[str, float] = field(default_factory=dict)
    """Mix domains (reward names; their tags are the reward's tag_included) by these
    probabilities; empty = sample prompts uniformly."""
    validation: Validation = field(default_factory=Validation)
    max_steps: int = 400
    """Training steps (one rollout batch and one optimizer step each)."""
    save_steps: int = 0
    """Save a checkpoint every N steps (0 = only at the end; always at the end): the HF
    export plus the state to resume from (checkpoint.py)."""
    save_total_limit: int = 0
    """Keep only the newest N checkpoints (0 = keep all)."""
    resume_from_checkpoint: Optional[str] = None
    """auto = continue from output_dir's latest checkpoint (start fresh if there is none);
    a checkpoints/step_N path = continue from it; None = start fresh."""
    max_consecutive_skips: int = 5
    """Steps with non-finite numbers (loss, gradient norm, teacher log-probs) are skipped;
    after this many in a row the run stops with an error (0 = never stop)."""
    output_dir: str = "runs/opd-{time}"
    """Where config.yaml, metrics.jsonl, TensorBoard events and checkpoints/ go."""
    overwrite_output_dir: bool = False
    """Allow writing into an output_dir that already holds a run's metrics."""
    seed: int = 0
    """Seed of data order, sampling and everything else."""
    device: str = "auto"
    """cuda | cpu | auto (cuda if available)."""
    verbose: bool = False
    """Show library output (vLLM, torch, warnings) on the console. Without it the console has
    opd's lines and errors only, and library output goes to output_dir/logs/rank<R>.log."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_config(argv):
    """--teacher.<field> addresses the single teacher 'default' (--teacher.default.<field>)."""
    fields = {f.name for f in dataclasses.fields(TeacherConfig)}
    argv = [f"--teacher.default.{a[10:]}" if a.startswith("--teacher.") and a[10:].split("=")[0] in fields
            else a for a in argv]
    return config.parse(Config, argv, description=__doc__.split("\n\n")[0], normalize=one_teacher)


def one_teacher(values):
    """YAML: a `teacher` mapping with teacher fields is one teacher, named 'default'."""
    t = values.get("teacher", "absent")
    if t is None:
        values["teacher"] = {}
    elif isinstance(t, dict) and set(t) & {f.name for f in dataclasses.fields(TeacherConfig)}:
        values["teacher"] = {"default": t}
    return values


# ----------------------------------------------------------------------------------------
# Distributed set-up and building the pieces


def init_distributed(device):
    """torchrun gives us RANK/WORLD_SIZE; plain `python opd.py` is a world of one."""
    if "RANK" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group()  # no backend given: gloo on CPU, nccl + gloo on GPU
    return dist.get_rank(), dist.get_world_size(), device


def fetch_models(cfg, rank):
    """Hub ids (e.g. Qwen/Qwen3-8B) -> local snapshots, which every rank reads its shards
    from: rank 0 downloads first, the others then find them in the cache."""
    for downloader in (True, False):
        if (rank == 0) == downloader:
            cfg.pretrain = loading.local_dir(cfg.pretrain)
            for t in cfg.teacher.values():
                t.model_name_or_path = loading.local_dir(t.model_name_or_path)
        dist.barrier()


# ----------------------------------------------------------------------------------------
# The loop


def main(cfg):
    rank, world, device = init_distributed(cfg.device)
    fetch_models(cfg, rank)
    tp = cfg.student_infer.tensor_parallel_size
    config.check_lengths(cfg)

    resume = checkpoint.prepare_output_dir(cfg, rank)  # the checkpoint to continue from, or None

    # ---- data: prompts rendered per tag (rlvr), or environments to play (agentic)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.pretrain)
    src = sources.make(cfg, tokenizer, dp_rank=rank // tp, dp_size=world // tp, banner=banner)
    all_tags, has_val = src.all_tags, bool(src.val)

    # ---- models: vLLM engine first (on GPU its memory check wants an empty device),
    # then the student (FSDP2, trained) and the teacher (FSDP2, forward only)
    torch.manual_seed(cfg.seed)
    si = cfg.student_infer
    for line in config.toy_values_notice(cfg) + loading.memory_estimate(  # before loading: does it fit?
            cfg.pretrain, cfg.student_train.dtype, [(n, t.model_name_or_path, t.dtype, t.device_mapping)
                                                    for n, t in cfg.teacher.items()],
            world, si.dtype, si.kv_cache_gib, si.gpu_memory_utilization, device):
        banner(line)
    for name, tc in cfg.teacher.items():
        teachers_lib.check_vocab(cfg.pretrain, tc.model_name_or_path, name, same_logits=cfg.opd_kl_mode != "sampled")
        if tc.tag_included and not set(tc.tag_included) & set(all_tags):
            banner(f"warning: teacher '{name}' routes no sample: none of its tags {tc.tag_included} "
                   f"is in the data ({all_tags})")
    llm = rollout.make_engine(
        cfg.pretrain, dtype=si.dtype, tensor_parallel_size=tp, seed=cfg.seed,
        max_model_len=cfg.prompt_length + cfg.response_length,
        gpu_memory_utilization=si.gpu_memory_utilization, enforce_eager=si.enforce_eager,
        kv_cache_gib=si.kv_cache_gib, enable_sleep_mode=si.sleep and device != "cpu")
    student, opt, sched = student_lib.build_student(cfg.pretrain, cfg.student_train, device, cfg.max_steps)
    teachers = [teachers_lib.load_teacher(  # in config order on every rank: groups are collective
        name, tc.model_name_or_path, device=device, dtype=DTYPES[tc.dtype], ranks=tc.device_mapping,
        attn_implementation=cfg.student_train.attn_implementation, coef=tc.opd_kl_coef,
        tag_included=tc.tag_included, micro_batch_size=tc.micro_batch_size)
        for name, tc in cfg.teacher.items()]
    tag_ids = {tag: i for i, tag in enumerate(all_tags)}
    vocab = student.get_output_embeddings().weight.shape[0]  # full mode: the teacher's top-V = all of it
    topk = {"sampled": 0, "topk": min(cfg.opd_kl_topk, vocab), "full": vocab}[cfg.opd_kl_mode]
    scorers = [] if cfg.off_policy else teachers  # off-policy: the samples are the teacher's own
    mode = ("plain RL" if not teachers else "off-policy distillation (SFT on teacher samples)"
            if cfg.off_policy else "mixed (RL + OPD)" if cfg.use_opd else "pure OPD")
    run = (checkpoint.resume_run(resume, student, opt, sched, src, llm, DTYPES[si.dtype]) if resume
           else checkpoint.Progress())
    logger = Logger(cfg.output_dir, rank == 0, keep_through=run.step if resume else -1)
    banner(f"opd: {mode}{' (agentic)' if cfg.pure_opd_pipeline_type == 'agentic' else ''}, {world} rank(s) "
           f"on {device}, {src.what}, output in {cfg.output_dir}")

    def validate(step):
        metrics, examples = src.validate(llm, device, step)
        llm.reset_prefix_cache()  # the next step starts from the same engine state as after a resume
        banner(f"val  {step:4d}/{cfg.max_steps} | " + " | ".join(f"{k[4:]} {v:.3f}" for k, v in metrics.items()))
        for ex in examples:
            banner(f"      {ex}")
        return metrics, examples

    last = {}
    if has_val and not resume:
        run.first, examples = validate(0)
        if teachers and cfg.validation.teacher:
            run.first.update(src.teacher_validate(teachers, device))
            banner("val  teacher | " + " | ".join(f"{k[4:]} {v:.3f}" for k, v in run.first.items() if "teacher" in k))
        logger.log(0, run.first, examples)
    for step in range(run.step + 1, cfg.max_steps + 1):
        t_step = time.perf_counter()

        # ---- 1. rollout: G answers per prompt (G episodes per env seed) on the local engine
        t0 = time.perf_counter()
        batch, records = src.sample(llm, teachers, device, step)
        if tp > 1:  # TP peers sampled the same groups: each keeps whole groups of its own
            keep = [i for i, g in enumerate(batch.group.tolist()) if g % tp == rank % tp]
            batch, records = batch.select(keep), [records[i] for i in keep]
        if si.sleep:
            rollout.sleep(llm)
        batch = batch.to(device)
        t_rollout = time.perf_counter() - t0

        # ---- 2. rewards: external ones, or the episodes' env rewards (for the gradient in
        # mixed mode / plain RL, else logged)
        t0 = time.perf_counter()
        reward, scored = src.rewards(batch, records)
        rl_adv = (rl_advantages(reward, batch.group.cpu(), cfg.adv_estimator).to(device)
                  if cfg.use_opd or not teachers else None)
        t_reward = time.perf_counter() - t0

        # ---- 3. teacher scoring of every sampled token
        t0 = time.perf_counter()
        teacher_logps, routed, t_each, top = teachers_lib.score(scorers, batch, tag_ids, topk=topk)
        t_teacher = time.perf_counter() - t0

        # ---- 4. advantage, loss, FSDP2 backward and optimizer step (skipped on bad numbers)
        t0 = time.perf_counter()
        sums, skipped = student_lib.train_step(student, opt, sched, batch, teacher_logps, routed, scorers,
                                      st=cfg.student_train, temperature=si.temperature,
                                      kl_estimator=cfg.kl_estimator, rl_adv=rl_adv, sft=cfg.off_policy,
                                      teacher_topk=top, kl_mode=cfg.opd_kl_mode)
        t_train = time.perf_counter() - t0

        # ---- 5. weight sync into the local vLLM engine (unless the weights did not change)
        t0 = time.perf_counter()
        if si.sleep:
            rollout.wake_up(llm)
        if not skipped:
            rollout.sync_weights(llm, student, DTYPES[si.dtype])
        else:  # as a sync would: the next step starts from an empty prefix cache, as after a resume
            llm.reset_prefix_cache()
        t_sync = time.perf_counter() - t0

        # ---- 6. log, validate, checkpoint
        sums.update(seqs=len(batch), all_tokens=batch.attention_mask.sum(),
                    **{f"routed/{t.name}": routed[t.name].sum() for t in scorers})
        validation.per_tag_sums(sums, "reward", reward, scored, batch.tags, all_tags)
        src.add_sums(sums, records)
        g = student_lib.reduce_sums(sums, device)
        step_s = time.perf_counter() - t_step
        run.advance(step, step_s, g["all_tokens"], skipped)
        timing = dict(rollout=t_rollout, reward=t_reward, teacher=t_teacher, train=t_train, sync=t_sync,
                      step=step_s, elapsed=run.elapsed)
        metrics = step_metrics(g, timing, t_each, scorers, all_tags, sched.get_last_lr()[0], device)
        metrics.update({"throughput/tokens_total": run.tokens_total, "train/skipped_steps": run.skipped_steps,
                        **src.metrics(g)})
        if "kl_dist" in g:  # the distribution-level KL the loss used: train/kl_topk | train/kl_full
            metrics[f"train/kl_{cfg.opd_kl_mode}"] = g["kl_dist"] / g["tokens"]
        examples = []
        if has_val and (step % cfg.validation.eval_steps == 0 or step == cfg.max_steps):
            last, examples = validate(step)
            metrics.update(last)
        logger.log(step, metrics, examples)
        banner(progress_line(step, cfg.max_steps, metrics, g))
        checkpoint.check_skips(run, skipped, cfg.max_consecutive_skips, cfg.output_dir)
        if step == cfg.max_steps or (cfg.save_steps and step % cfg.save_steps == 0):
            path = os.path.join(cfg.output_dir, "checkpoints", f"step_{step}")
            checkpoint.save_run(path, run, student, opt, sched, tokenizer, src, cfg.save_total_limit)
            banner(f"saved {path}")

    if has_val and last:
        name = src.score_name
        banner("\n".join(["", f"validation {name}, before and after:", *validation.summary(run.first, last, step, name)]))
    logger.close()
    dist.barrier()  # rank 0 may still be writing: a peer tearing down its groups early makes gloo abort
    del llm  # vLLM's shutdown tears down the default process group itself
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        cfg = parse_config(sys.argv[1:])  # before quiet_console: --help and flag errors print as usual
        if not cfg.verbose:
            logs.quiet_console(int(os.environ.get("RANK", "0")))  # library output -> a log file
        config.apply_toy_defaults(cfg, config.given_keys(sys.argv[1:]))
        config.check_config(cfg, world=int(os.environ.get("WORLD_SIZE", "1")))
        used = [cfg.pretrain, *(t.model_name_or_path for t in cfg.teacher.values())]
        toy.prepare_if_used(used + (cfg.data.file_name + cfg.validation.file_name  # data: rlvr only
                                    if cfg.pure_opd_pipeline_type == "rlvr" else []))
        toy_agentic.prepare_if_used(used)
        toy.prepare_if_used(used + cfg.data.file_name + cfg.validation.file_name, toy_long.TOY_DIR, toy_long.prepare)
        main(cfg)
    except (config.ConfigError, data.DataError, teachers_lib.TeacherError, agent.EnvError, checkpoint.ResumeError,
            checkpoint.TrainingError, loading.LoadError) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            logs.error(e)
        sys.exit(2)
