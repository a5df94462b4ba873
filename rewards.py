"""Verifiable rewards: a math rule (\\boxed answer vs ground truth) and a code sandbox.

Owns turning one sampled response into a scalar reward in {0.0, 1.0}:

* ``math_rule_reward``: the last ``\\boxed{...}`` of the response, compared with the
  ground truth by HF ``math_verify`` (symbolic/numeric equality, not string equality),
  under a hard time budget;
* ``code_sandbox_reward``: the last fenced Python block, run against stdin/stdout pairs
  or against Python test code, in a throw-away sandbox (see ``ISOLATION``);
* ``run_many`` / ``code_sandbox_rewards``: many samples on a thread pool (one sandbox
  process tree per sample at a time); ``score`` / ``score_samples``: dispatch on a seed
  record (``ground_truth``, ``test_cases``) for the trainer.

Simplified: Python is the only sandboxed language; a sample's test cases run one after
the other and stop at the first failure; rewards are binary (no partial credit). The
isolation itself (namespaces, rlimits, a uid of its own, cgroups) is sandbox.py.
"""

import atexit
import json
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

from sandbox import ISOLATION, run_sandboxed  # noqa: F401  (ISOLATION: re-exported for the README)

# --------------------------------------------------------------------------------------
# Math

MATH_TIMEOUT_S = 5.0  # whole budget of one check (both parses and all comparisons)
_HELPER_SLACK_S = 2.0  # a helper process past its own budget by this much is killed


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` in `text`, braces balanced, so
    ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}`` (also ``\\boxed 5``); None if none.
    One pass: a degenerate response repeating ``\\boxed{`` stays linear."""
    stack, best = [], None  # stack: content start of an open \boxed{, or None for a plain {
    for m in re.finditer(r"\\boxed\s*\{|\{|\}", text):
        if m.group() != "}":
            stack.append(m.end() if m.group() != "{" else None)
        elif stack:
            start = stack.pop()
            if start is not None and (best is None or start > best[0]):
                best = (start, m.start())
    bare = None
    for bare in re.finditer(r"\\boxed +([^\s${}]+)", text):
        pass  # "\boxed 5": TeX takes the next token; keep the last such
    if bare and (best is None or bare.start(1) > best[0]):
        return bare.group(1)
    return text[best[0]:best[1]] if best else None


def math_rule_reward(response: str, ground_truth: str, *, timeout_s: float = MATH_TIMEOUT_S) -> float:
    """1.0 if the last ``\\boxed{...}`` of `response` is mathematically equal to
    `ground_truth` (``\\frac{1}{2}`` = ``0.5``, ``2\\sqrt{2}`` = ``\\sqrt{8}``,
    ``68`` = ``68.0``), else 0.0. A response without ``\\boxed`` gets 0.0: the answer
    is never guessed from free text. Never raises (unparsable LaTeX is 0.0) and returns
    within about `timeout_s` (a check past its budget is 0.0).

    The ground truth may itself be ``\\boxed{...}`` or ``$...$``. In the main thread the
    budget is a SIGALRM timer (the only thing that interrupts a long big-int power in
    sympy; math_verify's own timer works the same way and, like it, this replaces any
    SIGALRM timer the caller had running); from any other thread the check runs in a
    helper process (one per concurrently calling thread, ~60 MB each, reused; it parses
    text, it does not execute it, so it is not sandboxed), killed when it overruns.
    math_verify logs once that its own timeouts are off: they are, in favour of ours.
    """
    try:
        answer = last_boxed(response or "")
        ground_truth = str(ground_truth)
        gold = last_boxed(ground_truth) if "\\boxed" in ground_truth else ground_truth.strip().strip("$")
        if not answer or not answer.strip() or not gold:
            return 0.0
        exact = _as_fraction(answer), _as_fraction(gold)
        if None not in exact:  # two numeric literals: exact rational equality, no sympy
            return float(exact[0] == exact[1])
        key = (answer, gold)
        if key not in _verdicts:  # answers repeat a lot across samples and steps
            if threading.current_thread() is threading.main_thread():
                ok = _math_equal(answer, gold, timeout_s)
            else:
                ok = _math_equal_in_helper(answer, gold, timeout_s)
            if len(_verdicts) >= _MAX_VERDICTS:
                _verdicts.clear()
            _verdicts[key] = ok
        return float(_verdicts[key])
    except (Exception, _MathTimeout):
        return 0.0


def _as_fraction(text: str):
    """`text` as an exact rational if it is a plain numeric literal ("68", "-0.50",
    "1e3"), else None. Such answers are most of a math batch and need no parser."""
    try:
        return Fraction(text.strip()) if _NUMBER.fullmatch(text.strip()) else None
    except (ValueError, ZeroDivisionError):
        return None


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_verdicts: dict = {}  # (answer, gold) -> equal; a timed-out check raises and is not cached
_MAX_VERDICTS = 100_000


class _MathTimeout(BaseException):
    """Raised by our SIGALRM handler. A BaseException, so that math_verify's and sympy's
    many `except Exception:` blocks do not swallow it and carry on computing."""


def _math_equal(answer: str, gold: str, timeout_s: float) -> bool:
    """math_verify equality under a SIGALRM budget. Main thread only (signals)."""
    from math_verify import LatexExtractionConfig, parse, verify

    armed = True

    def on_alarm(signum, frame):
        if armed:
            raise _MathTimeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    # The timer repeats every 0.1 s after the first shot in case a bare `except:` in
    # sympy eats one; math_verify's own (integer, per-call) timers are switched off.
    signal.setitimer(signal.ITIMER_REAL, timeout_s, 0.1)
    try:
        # LaTeX extraction only: the plain-expression extractor ends in sympy's eval-based
        # parse_expr, which we do not need for a \boxed answer.
        cfg = [LatexExtractionConfig()]
        g = parse(f"\\boxed{{{gold}}}", cfg, parsing_timeout=None)
        a = parse(f"\\boxed{{{answer}}}", cfg, parsing_timeout=None)
        return bool(g and a and verify(g, a, timeout_seconds=None))
    finally:
        armed = False  # first statement: no eval-breaker check, so no raise after this
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_helpers: list[subprocess.Popen] = []  # idle math helper processes
_helpers_lock = threading.Lock()


def _math_equal_in_helper(answer: str, gold: str, timeout_s: float) -> bool:
    """`_math_equal` in a helper process (where it runs in the main thread). A helper
    that overruns is killed, so no runaway computation is left behind in the trainer."""
    with _helpers_lock:
        proc = _helpers.pop() if _helpers else None
    proc = proc or _start_helper()
    try:
        os.write(proc.stdin.fileno(), (json.dumps([answer, gold, timeout_s]) + "\n").encode())
        reply = _read_line(proc.stdout.fileno(), time.monotonic() + timeout_s + _HELPER_SLACK_S)
    except OSError:
        reply = None
    if reply is None:
        proc.kill()
        proc.wait()
        return False
    with _helpers_lock:
        _helpers.append(proc)
    return json.loads(reply)


def _start_helper() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--math-helper"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    # Importing sympy takes a second or more: not charged to the first check's budget.
    if _read_line(proc.stdout.fileno(), time.monotonic() + 120) != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError("math helper process did not start")
    return proc


def _read_line(fd: int, deadline: float) -> str | None:
    """One line from `fd`, or None at EOF or when `deadline` passes."""
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        buf += chunk
    return buf.decode().strip()


def _math_helper_main():
    """The helper's loop: one JSON request per stdin line, one JSON bool per reply."""
    import math_verify  # noqa: F401  (import before saying ready)

    print("ready", flush=True)
    for line in sys.stdin:
        answer, gold, timeout_s = json.loads(line)
        try:
            ok = _math_equal(answer, gold, timeout_s)
        except (Exception, _MathTimeout):
            ok = False
        print(json.dumps(ok), flush=True)


@atexit.register
def _stop_helpers():
    with _helpers_lock:
        for proc in _helpers:
            proc.kill()
            proc.wait()
        _helpers.clear()


# --------------------------------------------------------------------------------------
# Code: what to run and what passes (the isolation itself is sandbox.py)

def extract_code(response: str) -> str | None:
    """The last fenced block tagged python/py/python3 or untagged (```...```);
    blocks in other languages (```text, ```bash) are skipped."""
    blocks = re.findall(r"^[ \t]*```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)^[ \t]*```", response or "",
                        flags=re.M | re.S | re.I)
    return textwrap.dedent(blocks[-1]) if blocks else None


def code_sandbox_reward(response: str, test_cases, *, timeout_s: float = 5.0, memory_mb: int = 512,
                        max_procs: int = 32, max_output_bytes: int = 1_000_000,
                        allow_unisolated: bool = False) -> float:
    """1.0 if the last fenced Python block of `response` passes every test case, else 0.0
    (no code block: 0.0).

    `test_cases` (or the same as a JSON string, as the seed data stores it):
    * a list of ``{"stdin": ..., "stdout": ...}`` (or ``input``/``output``) pairs, or an
      APPS-style ``{"inputs": [...], "outputs": [...]}``: one run per pair, passing when
      it exits 0 and its stdout equals the expected one up to surrounding whitespace and
      trailing spaces on each line;
    * a string of Python test code (asserts and/or ``test_*`` functions), appended to the
      solution in one file; every ``test_*`` function defined is called; it passes when the
      file exits 0 and reached its end (a per-run nonce printed last, so an early
      ``sys.exit(0)`` in the solution does not pass).
    Each run gets `timeout_s` wall clock (and about as much CPU), `memory_mb` of address
    space, `max_procs` processes and `max_output_bytes` of output, isolated as ``ISOLATION``
    describes. Empty or malformed `test_cases` raise ValueError (a data bug, not a wrong
    answer).
    """
    code = extract_code(response)
    tests = _decode_tests(test_cases)
    if code is None:
        return 0.0
    limits = dict(timeout_s=timeout_s, memory_mb=memory_mb, max_procs=max_procs,
                  max_output_bytes=max_output_bytes, allow_unisolated=allow_unisolated)
    if isinstance(tests, str):
        nonce = uuid.uuid4().hex
        r = run_sandboxed(f"{code}\n\n{tests}\n\n{_RUN_TEST_FUNCTIONS}print({nonce!r})\n", "", **limits)
        return float(r.returncode == 0 and nonce in r.stdout.splitlines())
    for stdin, expected in tests:
        r = run_sandboxed(code, stdin, **limits)
        if r.returncode != 0 or _norm(r.stdout) != _norm(expected):
            return 0.0
    return 1.0


_RUN_TEST_FUNCTIONS = """\
for _opd_name, _opd_fn in list(globals().items()):
    if _opd_name.startswith("test_") and callable(_opd_fn):
        _opd_fn()
"""


def _norm(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def _decode_tests(test_cases):
    """-> Python test code (str) or a non-empty list of (stdin, expected stdout)."""
    if isinstance(test_cases, str) and test_cases.strip()[:1] in ('[', '{', '"'):
        try:
            test_cases = json.loads(test_cases)
        except json.JSONDecodeError:
            pass  # Python test code that happens to start with one of those characters
    if isinstance(test_cases, str):
        if not test_cases.strip():
            raise ValueError("test_cases: empty")
        return test_cases
    if isinstance(test_cases, dict) and "inputs" in test_cases:  # APPS / TACO layout
        test_cases = [{"stdin": i, "stdout": o}
                      for i, o in zip(test_cases["inputs"], test_cases.get("outputs", []))]
    elif isinstance(test_cases, dict):
        test_cases = [test_cases]
    if not isinstance(test_cases, list) or not test_cases:
        raise ValueError(f"test_cases: expected Python test code or a non-empty list of "
                         f"{{stdin, stdout}} pairs, got {type(test_cases).__name__}")
    pairs = []
    for case in test_cases:
        stdin = case.get("stdin", case.get("input")) if isinstance(case, dict) else None
        stdout = case.get("stdout", case.get("output")) if isinstance(case, dict) else None
        if stdin is None or stdout is None:
            raise ValueError(f"test_cases: each case needs stdin/input and stdout/output, got {case!r:.200}")
        pairs.append(tuple("\n".join(map(str, v)) if isinstance(v, list) else str(v)  # list of lines
                           for v in (stdin, stdout)))
    return pairs


# --------------------------------------------------------------------------------------
# Many samples, dispatch


def _default_workers() -> int:
    return max(1, (os.cpu_count() or 2) // 2)  # leave half the cores to training


def run_many(fn, items, max_workers: int | None = None) -> list:
    """[fn(item) for item in items] on a thread pool (default: half the cores). Each item
    is typically one sample whose sandboxed processes run while the thread waits."""
    items = list(items)
    with ThreadPoolExecutor(max_workers=max_workers or _default_workers()) as pool:
        return list(pool.map(fn, items))


def code_sandbox_rewards(responses, test_cases_list, max_workers: int | None = None, **limits) -> list[float]:
    """`code_sandbox_reward` for each (response, test_cases) pair, in parallel."""
    return run_many(lambda pair: code_sandbox_reward(pair[0], pair[1], **limits),
                    zip(responses, test_cases_list), max_workers)


REWARD_FNS = {"math_rule": math_rule_reward, "code_sandbox": code_sandbox_reward}
_RECORD_FIELD = {"math_rule": "ground_truth", "code_sandbox": "test_cases"}


def check_record(kind: str, record: dict):
    """Raise ValueError if `record` lacks what the `kind` reward reads (math_rule:
    ``ground_truth``, code_sandbox: ``test_cases``); the trainer calls it at start-up."""
    if kind not in REWARD_FNS:
        raise ValueError(f"unknown reward type {kind!r}; known: {', '.join(REWARD_FNS)}")
    field = _RECORD_FIELD[kind]
    if record.get(field) in (None, ""):
        raise ValueError(f"{kind} reward: record {record.get('id', '?')!r} (tag "
                         f"{record.get('tag', '')!r}) has no '{field}'")


def check_records(reward_cfgs: dict, records: list[dict]):
    """`check_record` for every record and every reward ({name: (type, tag_included)})
    that covers its tag."""
    for name, (kind, tags) in reward_cfgs.items():
        for rec in records:
            if not tags or rec.get("tag", "") in tags:
                try:
                    check_record(kind, rec)
                except ValueError as e:
                    where = rec.get("_where", "")  # file:line, set by data.read_jsonl
                    raise ValueError(
                        f"{where + ': ' if where else ''}{e}. Reward '{name}' scores "
                        f"{'tags ' + str(tags) if tags else 'every tag'}: turn it off (rewards: {{}}) or "
                        f"scope it to the tags it can score (rewards.{name}.tag_included)") from None


def score(kind: str, response: str, record: dict) -> float:
    """The `kind` reward of `response` for a seed-format `record`."""
    check_record(kind, record)
    return REWARD_FNS[kind](response, record[_RECORD_FIELD[kind]])


def score_samples(reward_cfgs: dict, texts: list[str], records: list[dict], max_workers: int | None = None):
    """For the trainer: `reward_cfgs` is {name: (type, tag_included)}; a sample gets the
    sum of the rewards whose tags include its tag (empty = all). Returns (reward [B] float
    tensor, scored [B] bool tensor: covered by at least one reward). Math is scored in
    the calling thread (its timer needs the main thread), code on the thread pool."""
    import torch

    reward, scored = [0.0] * len(texts), [False] * len(texts)
    code_jobs = []
    for kind, tags in reward_cfgs.values():
        for i, rec in enumerate(records):
            if not tags or rec.get("tag", "") in tags:
                scored[i] = True
                if kind == "code_sandbox":
                    code_jobs.append(i)
                else:
                    reward[i] += score(kind, texts[i], rec)
    for i, r in zip(code_jobs, run_many(lambda i: score("code_sandbox", texts[i], records[i]),
                                         code_jobs, max_workers)):
        reward[i] += r
    return torch.tensor(reward, dtype=torch.float32), torch.tensor(scored, dtype=torch.bool)


def bench(n: int = 64, max_workers: int | None = None) -> float:
    """Print and return sandboxed test cases per second for `n` trivial passing programs
    (one stdin/stdout case each) through the parallel path."""
    response = "```python\nprint(int(input()) * 2)\n```"
    tests = [[{"stdin": f"{i}\n", "stdout": f"{2 * i}\n"}] for i in range(n)]
    code_sandbox_rewards([response], tests[:1])  # the one-off isolation probe, not timed
    t0 = time.perf_counter()
    out = code_sandbox_rewards([response] * n, tests, max_workers)
    dt = time.perf_counter() - t0
    assert out == [1.0] * n, out
    workers = max_workers or _default_workers()
    print(f"{n} sandboxed test cases in {dt:.2f} s with {workers} worker(s): {n / dt:.1f} cases/s")
    return n / dt


if __name__ == "__main__":
    if sys.argv[1:] == ["--math-helper"]:
        _math_helper_main()
    else:
        bench(int(sys.argv[1]) if sys.argv[1:] else 64)
