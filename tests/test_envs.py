"""envs.py: the built-in games, their experts, the invalid-action paths and the registry."""

import pytest

from conftest import ROOT  # noqa: F401  (puts the repo on sys.path)
import envs

SEEDS = range(300)
UNPARSABLE = ["", "abc", "\\boxed{x}", "1.5", "17 18", "boxed{17}", "\\boxed{17"]
MALFORMED = UNPARSABLE + ["99999", "-3"]  # the last two parse, but no game accepts them


def play_expert(env, seed, max_turns):
    obs, _ = env.reset(seed=seed)
    assert isinstance(obs, str) and obs
    for turn in range(1, max_turns + 1):
        obs, reward, terminated, truncated, info = env.step(env.expert())
        assert not truncated and not info.get("invalid"), (seed, turn, obs)
        if terminated:
            return turn, reward, info
        assert reward == 0.0 and info["success"] is False, (seed, turn, obs)
    raise AssertionError(f"seed {seed}: the expert did not finish within {max_turns} turns (last obs {obs!r})")


@pytest.mark.parametrize("env_type, config, max_turns", [
    ("guess_number", {"low": 1, "high": 50}, 6),   # bisection over 50 numbers: ceil(log2(51))
    ("nim", {}, 4),                                # 15 stones at most, 4 per round
])
def test_expert_wins_every_seed_within_the_turn_bound(env_type, config, max_turns):
    env = envs.make(env_type, **config)
    turns = []
    for seed in SEEDS:
        t, reward, info = play_expert(env, seed, max_turns)
        assert reward == 1.0 and info["success"] is True, (seed, info)
        turns.append(t)
    assert max(turns) == max_turns  # the bound is tight: some seed needs every turn
    assert min(turns) < max_turns


def test_guess_number_feedback_narrows_the_range():
    env = envs.GuessNumber(1, 50)
    env.reset(seed=0)
    secret = env.secret
    guess = 1 if secret != 1 else 50
    obs, reward, terminated, truncated, info = env.step(str(guess))
    word = "Higher" if guess < secret else "Lower"
    lo, hi = (2, 50) if guess < secret else (1, 49)
    assert obs == f"{word}. My number is from {lo} to {hi}." and reward == 0.0
    assert not terminated and not truncated and not info["success"]
    obs, reward, terminated, _, info = env.step(str(secret))
    assert (obs, reward, terminated, info["success"]) == ("Correct!", 1.0, True, True)


@pytest.mark.parametrize("action", MALFORMED + ["0", "51", "\\boxed{51}"])
def test_guess_number_invalid_action_is_answered_and_the_episode_goes_on(action):
    env = envs.GuessNumber(1, 50)
    env.reset(seed=3)
    secret = env.secret
    guess = 10 if secret > 10 else 40
    env.step(str(guess))  # narrow the range first: the invalid answer names the current one
    lo, hi = env.lo, env.hi
    obs, reward, terminated, truncated, info = env.step(action)
    assert obs.startswith("Invalid") and f"from {lo} to {hi}" in obs, obs
    assert reward == 0.0 and not terminated and not truncated
    assert info["invalid"] is True and info["success"] is False
    assert (env.lo, env.hi, env.secret) == (lo, hi, secret)  # the lost turn changed nothing
    obs, reward, terminated, _, info = env.step(str(secret))  # and the game still goes on
    assert (reward, terminated, info["success"]) == (1.0, True, True)


@pytest.mark.parametrize("action", MALFORMED + ["0", "4", "\\boxed{0}"])
def test_nim_invalid_action_loses_on_the_spot(action):
    env = envs.Nim()
    env.reset(seed=5)
    obs, reward, terminated, truncated, info = env.step(action)
    assert obs == "Invalid move. You lose."
    assert reward == 0.0 and terminated and not truncated
    assert info["invalid"] is True and info["success"] is False


def test_nim_taking_more_than_the_heap_is_invalid():
    env = envs.Nim(max_take=3)
    env.reset(seed=0)
    env.stones = 2  # a heap smaller than max_take
    obs, reward, terminated, _, info = env.step("3")
    assert terminated and reward == 0.0 and info["invalid"] is True, obs
    env.stones = 2
    obs, reward, terminated, _, info = env.step("2")
    assert (reward, terminated, info["success"]) == (1.0, True, True) and "invalid" not in info


@pytest.mark.parametrize("text", ["\\boxed{17}", " 17 ", "17", "\\boxed{ 17 }", "\n17\n", " \\boxed{17} "])
def test_integer_actions_parse(text):
    assert envs.parse_int(text) == 17
    env = envs.GuessNumber(1, 50)
    seed = next(s for s in range(1000) if env.reset(seed=s) and env.secret == 17)
    env.reset(seed=seed)
    obs, reward, terminated, _, info = env.step(text)
    assert (obs, reward, terminated, info["success"]) == ("Correct!", 1.0, True, True)


@pytest.mark.parametrize("text", UNPARSABLE)
def test_malformed_actions_do_not_parse(text):
    assert envs.parse_int(text) is None


def transcript(env_type, seed, actions):
    env = envs.make(env_type)
    out = [env.reset(seed=seed)[0]]
    for a in actions:
        obs, reward, terminated, _, _ = env.step(a)
        out.append((obs, reward))
        if terminated:
            break
    return out


def test_reset_is_deterministic_in_the_seed():
    guesses = [str(g) for g in range(1, 51)]  # a sweep: the feedback reveals the secret
    takes = ["1"] * 15                        # the opponent's replies reveal its moves
    for env_type, actions in [("guess_number", guesses), ("nim", takes)]:
        runs = {s: transcript(env_type, s, actions) for s in range(20)}
        assert all(transcript(env_type, s, actions) == runs[s] for s in runs), env_type
        assert len({repr(r) for r in runs.values()}) > 5, env_type  # and the seed matters
    # resetting the same object starts over: no state leaks from the previous episode
    env = envs.make("nim")
    first = env.reset(seed=7)[0]
    a = [env.step("1")[0] for _ in range(2)]
    assert env.reset(seed=7)[0] == first and [env.step("1")[0] for _ in range(2)] == a
    g = envs.make("guess_number")
    g.reset(seed=7)
    secret = g.secret
    g.step("25")
    assert g.reset(seed=7)[0] == "Guess my number from 1 to 50." and (g.secret, g.lo, g.hi) == (secret, 1, 50)


def test_nim_starts_are_winnable():
    env = envs.Nim(min_stones=5, max_stones=15, max_take=3)
    heaps = {env.reset(seed=s) and env.stones for s in range(200)}
    assert heaps and all(5 <= h <= 15 and h % 4 for h in heaps)


def test_registry_builds_with_config_and_names_unknown_types():
    env = envs.make("guess_number", low=3, high=4)
    assert env.reset(seed=0)[0] == "Guess my number from 3 to 4."
    nim = envs.make("nim", min_stones=6, max_stones=8, max_take=2)  # 6 is a losing heap: never dealt
    assert nim.starts == [7, 8] and {nim.reset(seed=s) and nim.stones for s in range(50)} == {7, 8}
    with pytest.raises(KeyError) as e:
        envs.make("nope")
    msg = str(e.value)
    assert "'nope'" in msg and "guess_number" in msg and "nim" in msg


@pytest.mark.parametrize("env_type, config", [
    ("guess_number", {"low": 5, "high": 5}),
    ("guess_number", {"low": 9, "high": 2}),
    ("nim", {"min_stones": 4, "max_stones": 4, "max_take": 3}),   # only a losing heap
    ("nim", {"min_stones": 8, "max_stones": 8}),
    ("nim", {"max_take": 0}),
    ("nim", {"max_take": -1}),
])
def test_bad_env_config_is_a_value_error_naming_the_env(env_type, config):
    try:
        envs.make(env_type, **config)
    except ValueError as e:
        assert str(e).startswith(f"{env_type}:"), e
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"BUG: {env_type}({config}) raised {type(e).__name__}: {e}, not a ValueError "
                             "naming the env") from e
    else:
        raise AssertionError(f"{env_type}({config}) was accepted")


def test_gem_game_through_the_adapter():
    """A GEM game (gem-llm) by id: bisection wins, a malformed action takes GEM's own
    invalid path, and GEM's reseeding of the global RNGs does not leak out."""
    import random

    import numpy as np

    random.seed(123)
    np.random.seed(123)
    expect = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    env = envs.make("gem:game:GuessTheNumber-v0-hard")  # 1..50, 7 turns
    obs, _ = env.reset(seed=1)
    assert "number" in obs.lower()
    lo, hi = 1, 50
    for turn in range(7):
        guess = (lo + hi) // 2
        obs, reward, terminated, truncated, info = env.step(f"\\boxed{{{guess}}}")
        if terminated or truncated:
            break
        lo, hi = (guess + 1, hi) if "higher" in obs else (lo, guess - 1)
    assert terminated and not truncated and reward == 1.0 and info["success"] is True
    assert (random.random(), np.random.rand()) == expect  # the trainer's streams are untouched
    env.reset(seed=1)
    obs, reward, terminated, truncated, info = env.step("no number here")
    assert terminated and reward < 0 and info["success"] is False
