"""Agentic environments: the GEM-style interface, a registry by id, two toy games.

An environment is a text game played over several turns:

    obs, info = env.reset(seed)                  # the first observation (the task)
    obs, reward, terminated, truncated, info = env.step(action)   # action: the model's text

the same interface as GEM (`gem-llm`), the library the seed's agentic pipeline uses. An
action the env cannot parse never raises: the env answers with its own invalid-action
outcome (feedback, and in some games the end of the episode). `info["success"]` tells,
at the end of an episode, whether it was won. `expert()` is a scripted player's next
action, used to build the toy world's teacher and in tests.

Built in (`make(env_type, **env_config)`):
  * `guess_number`  guess a secret integer in [low, high]; the feedback says higher or
                    lower and the range still possible. Expert: bisection.
  * `nim`           take 1..max_take stones in turn with a random opponent; whoever takes
                    the last stone wins. Expert: leave a multiple of max_take + 1.

Knows nothing about token ids, models or losses. Simplified: envs are plain Python
objects stepped in the trainer's process (no env workers, no async); rewards are 1 for a
win and 0 otherwise.
"""

import contextlib
import random
import re

_INT = re.compile(r"\s*(?:\\boxed\{\s*(-?\d+)\s*\}|(-?\d+))\s*")


def parse_int(action):
    """The integer an action states (`17` or `\\boxed{17}`, surrounding spaces allowed), else None."""
    m = _INT.fullmatch(action)
    return None if m is None else int(m.group(1) or m.group(2))


class GuessNumber:
    """Find a secret integer in [low, high]; each wrong guess is answered "Higher" or
    "Lower" with the range that is still possible. A reply that is not one integer in
    [low, high] is invalid: the env says so and the turn is lost (the episode goes on)."""

    def __init__(self, low=1, high=50):
        if not low < high:
            raise ValueError(f"guess_number: low ({low}) must be below high ({high})")
        self.low, self.high = int(low), int(high)

    def reset(self, seed=None):
        self.secret = random.Random(seed).randint(self.low, self.high)
        self.lo, self.hi = self.low, self.high
        return f"Guess my number from {self.lo} to {self.hi}.", {}

    def step(self, action):
        guess = parse_int(action)
        if guess is None or not self.low <= guess <= self.high:
            return (f"Invalid. Reply with one number from {self.lo} to {self.hi}.", 0.0, False, False,
                    {"invalid": True, "success": False})
        if guess == self.secret:
            return "Correct!", 1.0, True, False, {"success": True}
        if guess < self.secret:
            self.lo = max(self.lo, guess + 1)
            word = "Higher"
        else:
            self.hi = min(self.hi, guess - 1)
            word = "Lower"
        return f"{word}. My number is from {self.lo} to {self.hi}.", 0.0, False, False, {"success": False}

    def expert(self):
        return str((self.lo + self.hi) // 2)


class Nim:
    """A heap of stones; the player and a random opponent take 1..max_take in turn, and
    whoever takes the last stone wins. Episodes start from a winnable heap (not a
    multiple of max_take + 1). Taking an invalid number of stones loses on the spot."""

    def __init__(self, min_stones=5, max_stones=15, max_take=3):
        self.max_take = int(max_take)
        self.starts = [n for n in range(int(min_stones), int(max_stones) + 1)
                       if self.max_take >= 1 and n % (self.max_take + 1)]
        if not self.starts:
            raise ValueError(f"nim: no winnable start in [{min_stones}, {max_stones}] with max_take={max_take}")

    def reset(self, seed=None):
        self.rng = random.Random(seed)
        self.stones = self.rng.choice(self.starts)
        return (f"Nim: {self.stones} stones. Take 1 to {self.max_take}; "
                "whoever takes the last stone wins. How many do you take?"), {}

    def step(self, action):
        take = parse_int(action)
        if take is None or not 1 <= take <= min(self.max_take, self.stones):
            return "Invalid move. You lose.", 0.0, True, False, {"invalid": True, "success": False}
        self.stones -= take
        if self.stones == 0:
            return "You took the last stone. You win!", 1.0, True, False, {"success": True}
        theirs = self.rng.randint(1, min(self.max_take, self.stones))
        self.stones -= theirs
        if self.stones == 0:
            return f"I take {theirs}, the last stone. You lose.", 0.0, True, False, {"success": False}
        return f"I take {theirs}. {self.stones} stones left. How many do you take?", 0.0, False, False, {
            "success": False}

    def expert(self):
        return str(self.stones % (self.max_take + 1) or 1)


ENVS = {"guess_number": GuessNumber, "nim": Nim}


def make(env_type, **env_config):
    """A new environment by id: a built-in name, or `gem:<GEM env id>` (needs gem-llm)."""
    if env_type.startswith("gem:"):
        return GemEnv(env_type[4:], **env_config)
    if env_type not in ENVS:
        raise KeyError(f"unknown env_type {env_type!r}; known: {', '.join(sorted(ENVS))}, gem:<id>")
    return ENVS[env_type](**env_config)


class GemEnv:
    """A GEM environment (`gem.make(id)`, gem-llm 0.1.0) behind the same interface.

    GEM's reset(seed) reseeds the process-global `random` and numpy generators; the
    adapter puts them back, so playing a GEM game does not change the trainer's other
    random streams. GEM's info carries no success flag: a win is an episode that
    terminated (not truncated) with a positive reward (GuessTheNumber gives a partial
    reward when the turns run out, with truncated set)."""

    def __init__(self, env_id, **env_config):
        with _global_rng_kept():  # importing GEM draws from the global RNG too
            try:
                import gem
            except ImportError:
                raise KeyError(f"env_type 'gem:{env_id}' needs the gem-llm package (pip install gem-llm)") from None
            try:
                self.env = gem.make(env_id, **env_config)
            except ValueError as e:
                if "not found in registry" not in str(e):
                    raise
                raise KeyError(f"unknown env_type 'gem:{env_id}': GEM says: {e}") from None

    def reset(self, seed=None):
        with _global_rng_kept():
            return self.env.reset(seed=seed)

    def step(self, action):
        with _global_rng_kept():
            obs, reward, terminated, truncated, info = self.env.step(action)
        info = dict(info or {})
        info.setdefault("success", bool(terminated and not truncated and reward > 0))
        return obs, float(reward), bool(terminated), bool(truncated), info


@contextlib.contextmanager
def _global_rng_kept():
    import numpy as np

    state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(state)
        np.random.set_state(np_state)
