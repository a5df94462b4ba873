"""Agentic rollouts: multi-turn episodes in environments, token ids in and token ids out.

One training row per episode. The first observation is rendered with the chat template
(the row's prompt); after it, each turn appends the **sampled token ids verbatim** (mask 1,
with the sampler's logprob), then the env's next observation as token ids with mask 0:
the text that closes the assistant turn, a user turn holding the observation, and the
opening of the next assistant turn. Earlier turns are never decoded and re-encoded, and
never re-rendered by the template (templates that drop earlier `<think>` blocks would
otherwise change tokens the sampler already scored).

Owns
  * `ObservationIds`   the ids that wrap an observation as the next user turn, cut from
                       the chat template once per template.
  * `play`             all live episodes advance together: one batched `act` per turn (one
                       vLLM `generate` for the student, never one call per episode); an
                       episode ends when the env terminates or truncates, at its env's
                       `max_turns`, or at the context limit (a row always ends on an action:
                       no observation is appended past the limit).
  * `vllm_actor` / `teacher_actor`   the student sampling on its local engine; a teacher
                       playing greedily (its own validation success).
  * `to_rollout`       episodes -> the `Rollout` batch the teachers and the loss take.
  * `EnvGroups`        each step's episodes: `num_return_sequences_in_group` episodes per
                       env seed (so GRPO works in mixed mode and plain RL), tags in turn.
  * `evaluate` / `teacher_success`   greedy validation episodes: `val/<tag>/success`.

Knows nothing about teachers' scoring or losses. Simplified: envs are stepped one after
another in the trainer's process; an episode's reward is the sum of its env rewards.
"""

import itertools
import random
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import data
import envs
import rollout
import validation
from student import reduce_sums

_ACTION, _OBS = "\u2063ACTION\u2063", "\u2063OBSERVATION\u2063"  # markers no template contains


class EnvError(ValueError):
    """An environment that cannot be played with this config (the message names the key)."""


class ObservationIds:
    """Token ids that put an observation into the conversation after an action.

    The chat template renders [user, assistant (a marker), user (a marker)] with the
    generation prompt; the text between the two markers closes the assistant turn and opens
    the user turn, the text after the second marker closes it and opens the next assistant
    turn. Only text that follows the action is taken from the template, so an action is
    never re-rendered. If the action ended with the closing text's first token (the end of
    turn: `<|im_end|>` in ChatML, `<end_of_turn>` in Gemma) it is already in the row and is
    not added again; any other ending (cut by the token limit, or another stop token such as
    Qwen3's `<|endoftext|>`) gets the whole closing text."""

    def __init__(self, tokenizer, template="native"):
        self.tokenizer = tokenizer
        msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _ACTION},
                {"role": "user", "content": _OBS}]
        text = data.render(tokenizer, msgs, template)
        if text.count(_ACTION) != 1 or text.count(_OBS) != 1:
            raise ValueError(f"chat template {template!r} does not render an assistant turn followed by a "
                             "user turn; agentic rows need one")
        after = text.split(_ACTION)[1]
        self.before_obs, self.after_obs = after.split(_OBS)
        first = tokenizer.encode(self.before_obs, add_special_tokens=False)[:1]
        self.close_id = first[0] if first else None           # the id that ends a turn
        self.close_text = tokenizer.decode(first) if first else ""

    def __call__(self, obs, last_id):
        """The ids to append after an action whose last token is `last_id`."""
        head = self.before_obs
        if last_id == self.close_id and head.startswith(self.close_text):
            head = head[len(self.close_text):]
        return self.tokenizer.encode(head + obs + self.after_obs, add_special_tokens=False)


_wrappers = {}


def observation_ids(tokenizer, template):
    """The (cached) ObservationIds of a tokenizer and template."""
    key = (id(tokenizer), template)
    if key not in _wrappers:
        _wrappers[key] = ObservationIds(tokenizer, template)
    return _wrappers[key]


@dataclass
class Episode:
    env: object
    tag: str
    group: int
    prompt: list                  # the first observation, rendered: the row's prompt
    max_turns: int
    max_tokens: int               # per action
    obs_ids: ObservationIds       # wraps later observations (the tag's chat template)
    ids: list = field(default_factory=list)   # all after the prompt: actions and observations
    mask: list = field(default_factory=list)  # 1 on sampled tokens, 0 on observation tokens
    logp: list = field(default_factory=list)  # the sampler's logprob of sampled tokens (0 elsewhere)
    reward: float = 0.0
    turns: int = 0
    success: bool = False
    cut_turns: int = 0            # actions cut by the token limit (max_tokens_per_turn or the context)
    end: str = ""                 # terminated | truncated | max_turns | context
    actions: list = field(default_factory=list)  # decoded actions and observations (for display)

    def __len__(self):
        return len(self.prompt) + len(self.ids)


def start(spec, tag, seed, group, tokenizer, template, prompt_length):
    """A reset env as an Episode. `spec` is the env's config (env_type, env_config,
    max_turns, max_tokens_per_turn). Returns None if the first observation is longer than
    `prompt_length` tokens."""
    env = envs.make(spec.env_type, **spec.env_config)
    obs, _ = env.reset(seed=seed)
    prompt = tokenizer.encode(data.render(tokenizer, [{"role": "user", "content": obs}], template),
                              add_special_tokens=False)
    if len(prompt) > prompt_length:
        return None
    return Episode(env, tag, group, prompt, spec.max_turns, spec.max_tokens_per_turn,
                   observation_ids(tokenizer, template), actions=[obs])


def play(act, episodes, tokenizer, max_len, *, turns=None):
    """Play `episodes` to their end. Each turn every live episode's row so far goes to one
    `act(rows, budgets)` call, which returns (token ids, logprobs) per row, at most `budget`
    tokens each. `max_len` is the context limit (prompt + everything after it).
    `turns`: call `act` exactly this many times, even with no live episode left (actors
    that are collectives over a group of ranks must be called the same number of times
    on every rank); None = stop as soon as all episodes have ended."""
    for turn in range(turns if turns is not None else max((e.max_turns for e in episodes), default=0)):
        live = [e for e in episodes if not e.end]
        if not live and turns is None:
            break
        budgets = [min(e.max_tokens, max_len - len(e)) for e in live]
        outs = act([e.prompt + e.ids for e in live], budgets)
        for e, budget, (ids, logp) in zip(live, budgets, outs):
            e.ids += ids
            e.mask += [1] * len(ids)
            e.logp += list(logp)
            e.turns += 1
            last = ids[-1] if ids else None
            e.cut_turns += len(ids) >= budget and last != e.obs_ids.close_id
            action = tokenizer.decode(ids, skip_special_tokens=True)
            action = action.rsplit("</think>", 1)[-1].strip() if "</think>" in action else action  # the answer only
            obs, reward, terminated, truncated, info = e.env.step(action)
            e.reward += float(reward)
            e.success = bool(info.get("success", False))
            e.actions += [action, obs]
            if terminated or truncated or e.turns >= e.max_turns:
                e.end = "terminated" if terminated else "truncated" if truncated else "max_turns"
                continue
            more = e.obs_ids(obs, last)
            if len(e) + len(more) + 1 > max_len:  # no room for the observation and one token
                e.end = "context"
                continue
            e.ids += more
            e.mask += [0] * len(more)
            e.logp += [0.0] * len(more)
    for e in episodes:
        e.end = e.end or "max_turns"
    return episodes


def vllm_actor(llm, *, temperature=1.0, top_p=1.0, top_k=-1, seed_key=None):
    """The student acting: one batched generate on the local engine per turn. `seed_key`:
    each request is seeded from (seed_key, turn, row), so a replayed step samples the same
    tokens (rollout.request_seed); None = the engine's own random stream."""
    from vllm.inputs import TokensPrompt

    turn = itertools.count()

    def act(rows, budgets):
        if not rows:
            return []
        k = next(turn)
        seeds = [None if seed_key is None else rollout.request_seed(*seed_key, k, i) for i in range(len(rows))]
        params = [rollout.sampling_params(n=1, max_tokens=b, temperature=temperature, top_p=top_p, top_k=top_k,
                                          seed=s) for b, s in zip(budgets, seeds)]
        outs = llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params, use_tqdm=False)
        return [(list(o.outputs[0].token_ids), rollout.sampled_logprobs(o.outputs[0], list(o.outputs[0].token_ids)))
                for o in outs]
    return act


def teacher_actor(t, *, max_tokens, eos_id, pad_id, device):
    """A teacher acting greedily. teachers.generate is a collective over the teacher's
    group that decodes exactly `max_tokens` steps: `play` must call it every turn on every
    member, with the same `max_tokens` everywhere; each answer is then cut to its budget."""
    import teachers as teachers_lib

    def act(rows, budgets):
        answers = teachers_lib.generate(t, rows, max_tokens=max_tokens, eos_id=eos_id,
                                        pad_id=pad_id, device=device)
        return [(a[:b], [0.0] * len(a[:b])) for a, b in zip(answers, budgets)]
    return act


def to_rollout(episodes, pad_id):
    """The episodes as one Rollout: prompt = first observation, then the turns (mask 1 on
    sampled tokens only)."""
    t = lambda xs, dt: [torch.tensor(x, dtype=dt) for x in xs]
    return rollout.collate(t([e.prompt for e in episodes], torch.long), t([e.ids for e in episodes], torch.long),
                           t([e.logp for e in episodes], torch.float32),
                           torch.tensor([e.group for e in episodes]), [e.tag for e in episodes], pad_id,
                           mask_rows=t([e.mask for e in episodes], torch.float32))


class EnvGroups:
    """Endless global batches of `n_groups` env seeds; this data-parallel rank plays its
    slice, each seed `group_size` times. Tags take turns over the global batch; seeds come
    from one seeded stream (the same on every rank, so the slices are disjoint)."""

    def __init__(self, specs, tags, n_groups, group_size, *, seed, dp_rank=0, dp_size=1):
        self.specs, self.tags, self.n_groups, self.group_size = specs, tags, n_groups, group_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.rng, self.k = random.Random(seed), 0

    def next(self, tokenizer, template_of, prompt_length):
        batch = []
        for _ in range(self.n_groups):
            batch.append((self.tags[self.k % len(self.tags)], self.rng.randrange(10**9)))
            self.k += 1
        # every rank checks every seed of the global batch, so that all stop with the same error
        # (one rank stopping alone would leave the others waiting in a collective)
        check_first_observations(self.specs, batch, tokenizer, template_of, prompt_length)
        share = self.n_groups // self.dp_size
        return [start(self.specs[tag], tag, seed, g, tokenizer, template_of(tag), prompt_length)
                for g, (tag, seed) in enumerate(batch[self.dp_rank * share:(self.dp_rank + 1) * share])
                for _ in range(self.group_size)]

    def state_dict(self):
        """The position in the seed stream (for an exact resume)."""
        return {"rng": self.rng.getstate(), "k": self.k}

    def load_state_dict(self, state):
        self.rng.setstate(state["rng"])
        self.k = state["k"]


def check_first_observations(specs, pairs, tokenizer, template_of, prompt_length):
    """EnvError if the first observation of any (tag, seed) is longer than prompt_length."""
    for tag, seed in pairs:
        if start(specs[tag], tag, seed, 0, tokenizer, template_of(tag), prompt_length) is None:
            raise EnvError(f"custom_envs.{tag}: the first observation (seed {seed}) is longer than "
                           f"prompt_length={prompt_length} tokens; raise prompt_length")


def episode_sums(sums, episodes, all_tags):
    """Add per-tag sums of success, reward and turns (and counts) to `sums` (for env/<tag>/...),
    and of cut turns and context-limit ends over all episodes."""
    for tag in all_tags:
        mine = [e for e in episodes if e.tag == tag]
        sums[f"env/{tag}/n"] = len(mine)
        sums[f"env/{tag}/success"] = sum(e.success for e in mine)
        sums[f"env/{tag}/reward"] = sum(e.reward for e in mine)
        sums[f"env/{tag}/turns"] = sum(e.turns for e in mine)
    sums["env/n"] = len(episodes)
    sums["env/cut_turns"] = sum(e.cut_turns for e in episodes)
    sums["env/context_ends"] = sum(e.end == "context" for e in episodes)


def episode_means(g, all_tags):
    out = {f"env/{tag}/{k}": g[f"env/{tag}/{k}"] / g[f"env/{tag}/n"]
           for tag in all_tags if g[f"env/{tag}/n"] for k in ("success", "reward", "turns")}
    out.update({"env/cut_turns": g["env/cut_turns"] / max(g["env/n"], 1),  # per episode
                "env/context_end_frac": g["env/context_ends"] / max(g["env/n"], 1)})
    return out


def val_seeds(tags, n):
    """The validation episodes: (tag, seed) pairs, `n` per tag, seeds apart from training's
    stream (which draws below 10**9)."""
    return [(tag, 10**9 + i) for tag in tags for i in range(n)]


def _success_metrics(episodes, pairs, prefix, name, device, counted=True):
    """val/<tag>/<name> and val/<name>: the share of won episodes, summed over all ranks."""
    tags, sums = sorted({tag for tag, _ in pairs}), {}
    success = torch.tensor([float(e.success) for e in episodes], dtype=torch.float64)
    validation.per_tag_sums(sums, prefix, success, torch.full((len(episodes),), counted, dtype=torch.bool),
                            [e.tag for e in episodes], tags)
    g = reduce_sums(sums, device)
    return {f"{prefix}/{name}": g[f"{prefix}/sum"] / max(g[f"{prefix}/n"], 1),
            **validation.per_tag_means(g, prefix, name, tags)}


def transcript(e):
    return f"[{e.tag}] " + " | ".join(f"{a!r}" for a in e.actions) + f" (reward {e.reward:.2f}, {e.end})"


def evaluate(llm, pairs, specs, tokenizer, template_of, cfg, device, seed_key=None):
    """The student plays the validation episodes greedily, this rank a share (TP peers
    the same share, counted once). Returns (val/<tag>/success + val/success, examples)."""
    tp = cfg.student_infer.tensor_parallel_size
    rank, dp = dist.get_rank(), dist.get_world_size() // tp
    mine = pairs[rank // tp::dp]
    eps = [start(specs[tag], tag, seed, i, tokenizer, template_of(tag), cfg.prompt_length)
           for i, (tag, seed) in enumerate(mine)]
    play(vllm_actor(llm, temperature=cfg.validation.temperature, seed_key=seed_key), eps, tokenizer,
         cfg.prompt_length + cfg.response_length)
    metrics = _success_metrics(eps, pairs, "val", "success", device, counted=rank % tp == 0)
    firsts = [next(e for e in eps if e.tag == tag) for tag in sorted({e.tag for e in eps})]  # one per tag
    shown = (firsts + [e for e in eps if e not in firsts])[:cfg.validation.num_examples]
    return metrics, [transcript(e) for e in shown] if rank == 0 else []


def teacher_success(teachers, pairs, specs, tokenizer, template_of, cfg, device):
    """`val/<tag>/teacher_success` and `val/teacher_success`: each tag's teacher (the first
    that routes it) plays that tag's validation episodes greedily, each member of its group
    a share; disjoint groups play at the same time."""
    owner = {tag: next((t.name for t in teachers if t.routes([tag])[0]), None) for tag, _ in pairs}
    turns = max(s.max_turns for s in specs.values())
    eps = []
    for t in teachers:
        if t.model is None:
            continue
        share = [p for p in pairs if owner[p[0]] == t.name][t.ranks.index(dist.get_rank())::len(t.ranks)]
        mine = [start(specs[tag], tag, seed, i, tokenizer, template_of(tag), cfg.prompt_length)
                for i, (tag, seed) in enumerate(share)]
        act = teacher_actor(t, max_tokens=max(s.max_tokens_per_turn for s in specs.values()),
                            eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id or 0, device=device)
        play(act, mine, tokenizer, cfg.prompt_length + cfg.response_length, turns=turns)
        eps += mine
    return _success_metrics(eps, pairs, "val", "teacher_success", device)
