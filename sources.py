"""What the student plays: prompts from data files (rlvr) or episodes in environments (agentic).

`make(cfg, tokenizer, dp_rank, dp_size)` returns one of two objects with the same small
interface, so the training loop reads the same for both pipelines:

    batch, records = src.sample(llm, teachers, device, step)  # this rank's Rollout + a record per row
    reward, scored = src.rewards(batch, records)          # [B] reward, [B] bool (has a reward)
    src.add_sums(sums, records); src.metrics(g)           # pipeline-specific step metrics
    src.validate(llm, device, step); src.teacher_validate(teachers, device)
    src.state_dict(); src.load_state_dict(state)          # the data position (exact resume)

`Prompts`: seed-format jsonl rendered per tag, G samples per prompt on the local engine
(or the teacher's own samples for the off-policy baseline), rewards from `rewards.py`,
validation accuracy. `Episodes`: G episodes per env seed played turn by turn (agent.py),
the env's reward, env/<tag>/* metrics, validation success. Not a framework: two classes.
"""

import torch

import agent
import data
import rewards
import rollout
import teachers as teachers_lib
import validation


def make(cfg, tokenizer, dp_rank, dp_size, banner=print):
    kind = Episodes if cfg.pure_opd_pipeline_type == "agentic" else Prompts
    return kind(cfg, tokenizer, dp_rank, dp_size, banner)


class Prompts:
    """Single-turn prompts (rlvr)."""

    score_name = "accuracy"

    def __init__(self, cfg, tokenizer, dp_rank, dp_size, banner):
        """Prompts rendered per tag, skipped when too long or routed nowhere; the validation
        prompts; each record checked against the rewards that will score it."""
        self.cfg, self.tokenizer, self.dp_rank = cfg, tokenizer, dp_rank
        # the tag lists of what can use a prompt: rewards (also for validation) and teachers
        reward_tags = [r.tag_included for r in cfg.rewards.values()]
        teacher_tags = [t.tag_included for t in cfg.teacher.values()]
        load = lambda files, users: data.load_prompts(files, tokenizer, cfg.prompt_length,
                                                      cfg.global_template, cfg.tag_to_template, users)
        items, notes = load(cfg.data.file_name, reward_tags + teacher_tags)
        domains = {name: [i for i, (_, rec) in enumerate(items)
                          if not r.tag_included or rec.get("tag", "") in r.tag_included]
                   for name, r in cfg.rewards.items()}
        self.batches = data.PromptBatches(items, cfg.rollout_batch_size, seed=cfg.seed, dp_rank=dp_rank,
                                          dp_size=dp_size, domains=domains,
                                          domain_probs=cfg.domain_interleave_probs)
        self.val, val_notes = (load(cfg.validation.file_name, reward_tags)  # scored by rewards only
                               if cfg.validation.file_name and cfg.validation.eval_steps else ([], []))
        for note in notes + val_notes:
            banner(f"data: {note}")
        self.reward_cfgs = {name: (r.type, r.tag_included) for name, r in cfg.rewards.items()}
        try:  # a record that a reward cannot score stops the run now, not mid-run
            rewards.check_records(self.reward_cfgs, [rec for _, rec in items + self.val])
        except ValueError as e:
            raise data.DataError(f"data: {e}") from None
        self.what = f"{len(items)} prompts"
        # off-policy SFT trains on the teacher's answers: written up front (teacher_data.py,
        # sampled with vLLM) when the data carries them, else decoded by the teacher each step
        self.from_file = cfg.off_policy and data.teacher_answers(items, cfg.num_return_sequences_in_group,
                                                                  cfg.response_length)
        if cfg.off_policy:
            self.what += (" with the teacher's answers from the data files" if self.from_file else
                          ", the teacher answering each step (teachers.generate; teacher_data.py samples "
                          "them up front with vLLM, much faster)")
        self.all_tags = sorted({rec.get("tag", "") for _, rec in items})

    def sample(self, llm, teachers, device, step):
        cfg, si, tok = self.cfg, self.cfg.student_infer, self.tokenizer
        prompts = self.batches.next()
        ids, tags = [ids for ids, _ in prompts], [r.get("tag", "") for _, r in prompts]
        G, pad_id = cfg.num_return_sequences_in_group, tok.pad_token_id or 0
        if self.from_file:  # the baseline: the student will imitate the teacher's answers
            batch = teacher_batch(prompts, G, pad_id)
        elif cfg.off_policy:
            batch = teachers_lib.teacher_rollout(teachers[0], ids, tags, n=G, max_tokens=cfg.response_length,
                                                 temperature=si.temperature, eos_id=tok.eos_token_id,
                                                 pad_id=pad_id, device=device)
        else:
            batch = rollout.generate(llm, ids, tags, n=G, max_tokens=cfg.response_length,
                                     temperature=si.temperature, top_p=si.top_p, top_k=si.top_k, pad_id=pad_id,
                                     seed_key=(cfg.seed, step, self.dp_rank))
        return batch, [prompts[g][1] for g in batch.group.tolist()]

    def rewards(self, batch, records):
        texts = self.tokenizer.batch_decode(batch.response_ids(), skip_special_tokens=True)
        return rewards.score_samples(self.reward_cfgs, texts, records)

    def add_sums(self, sums, records):
        pass

    def metrics(self, g):
        return {}

    def validate(self, llm, device, step):
        return validation.evaluate(llm, self.val, self.tokenizer, self.cfg, self.reward_cfgs, device,
                                   seed_key=("val", self.cfg.seed, step, self.dp_rank))

    def state_dict(self):
        return self.batches.state_dict()

    def load_state_dict(self, state):
        self.batches.load_state_dict(state)

    def teacher_validate(self, teachers, device):
        return validation.teacher_accuracy(teachers, self.val, self.tokenizer, self.cfg, self.reward_cfgs, device)


def teacher_batch(prompts, n, pad_id):
    """A Rollout of the first `n` teacher answers stored with each prompt (off-policy SFT:
    no ratio, so rollout_logp is 0)."""
    rows = [torch.tensor(ids) for ids, _ in prompts for _ in range(n)]
    answers = [torch.tensor(a) for _, rec in prompts for a in rec["teacher_completion_ids"][:n]]
    return rollout.collate(rows, answers, [torch.zeros(len(a)) for a in answers],
                           torch.arange(len(prompts)).repeat_interleave(n),
                           [rec.get("tag", "") for _, rec in prompts for _ in range(n)], pad_id)


class Episodes:
    """Multi-turn episodes in custom_envs (agentic)."""

    score_name = "success"

    def __init__(self, cfg, tokenizer, dp_rank, dp_size, banner):
        """The training env groups and the validation episodes (tag, seed)."""
        self.cfg, self.tokenizer, self.dp_rank = cfg, tokenizer, dp_rank
        train_tags = cfg.train_env_manager.tags or sorted(cfg.custom_envs)
        val_tags = cfg.val_env_manager.tags or sorted(cfg.custom_envs)
        self.groups = agent.EnvGroups(cfg.custom_envs, train_tags, cfg.rollout_batch_size,
                                      cfg.num_return_sequences_in_group, seed=cfg.seed, dp_rank=dp_rank,
                                      dp_size=dp_size)
        self.val = agent.val_seeds(val_tags, cfg.val_env_manager.num_env_groups) if cfg.validation.eval_steps else []
        self.what = f"envs {', '.join(train_tags)}"
        self.all_tags = sorted(set(train_tags) | set(val_tags))

    def template_of(self, tag):
        return self.cfg.tag_to_template.get(tag, self.cfg.global_template)

    def sample(self, llm, teachers, device, step):
        """G episodes per env seed, all advancing together: one generate per turn."""
        cfg, si = self.cfg, self.cfg.student_infer
        episodes = self.groups.next(self.tokenizer, self.template_of, cfg.prompt_length)
        agent.play(agent.vllm_actor(llm, temperature=si.temperature, top_p=si.top_p, top_k=si.top_k,
                                    seed_key=(cfg.seed, step, self.dp_rank)),
                   episodes, self.tokenizer, cfg.prompt_length + cfg.response_length)
        return agent.to_rollout(episodes, self.tokenizer.pad_token_id or 0), episodes

    def rewards(self, batch, records):
        return torch.tensor([e.reward for e in records]), torch.ones(len(records), dtype=torch.bool)

    def add_sums(self, sums, records):
        agent.episode_sums(sums, records, self.all_tags)

    def metrics(self, g):
        return agent.episode_means(g, self.all_tags)

    def validate(self, llm, device, step):
        return agent.evaluate(llm, self.val, self.cfg.custom_envs, self.tokenizer, self.template_of, self.cfg, device,
                              seed_key=("val", self.cfg.seed, step, self.dp_rank))

    def state_dict(self):
        return self.groups.state_dict()

    def load_state_dict(self, state):
        self.groups.load_state_dict(state)

    def teacher_validate(self, teachers, device):
        return agent.teacher_success(teachers, self.val, self.cfg.custom_envs, self.tokenizer, self.template_of,
                                     self.cfg, device)
