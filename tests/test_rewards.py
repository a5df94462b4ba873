"""rewards.py: the math rule, the code sandbox and its isolation against hostile programs.

The adversarial tests need what the sandbox needs (root, namespaces); each checks that
the hostile program gets reward 0, returns within its limit, and leaves no process of
any sandbox uid behind."""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import rewards as R
import sandbox as S

TIMEOUT = 2.0  # wall-clock limit given to the hostile programs
SLACK = 1.5  # start-up and teardown allowance on a busy 2-core machine
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def py(code):
    return f"Here is my solution:\n```python\n{code}\n```\n"


# The sandbox needs root; without it code_sandbox_reward raises (test_unisolated_needs_consent).
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the code sandbox needs root")


def sandbox_procs():
    return S._pids_of_uids(set(range(S.SANDBOX_UID_BASE, S.SANDBOX_UID_BASE + S.MAX_SANDBOXES)))


# --------------------------------------------------------------------------------------
# math_rule


@pytest.mark.parametrize("answer, truth", [
    (r"\frac{1}{2}", "0.5"), ("0.5", r"\frac{1}{2}"), (r"2\sqrt{2}", r"\sqrt{8}"), ("68", "68.0"),
    ("68.0", "68"), (r"\dfrac{3}{6}", "1/2"), ("5", r"\boxed{5}"), ("7", "$7$"),
])
def test_math_equal_forms_get_1(answer, truth):
    assert R.math_rule_reward(f"So the answer is \\boxed{{{answer}}}.", truth) == 1.0


def test_math_wrong_answer_gets_0():
    assert R.math_rule_reward(r"\boxed{\frac{1}{3}}", "0.5") == 0.0
    assert R.math_rule_reward(r"\boxed{67}", "68") == 0.0


def test_math_without_boxed_gets_0():
    assert R.math_rule_reward("The answer is 0.5", "0.5") == 0.0
    assert R.math_rule_reward("$\\frac{1}{2}$", "0.5") == 0.0
    assert R.math_rule_reward("", "0.5") == 0.0


def test_math_last_box_wins():
    assert R.math_rule_reward(r"first \boxed{3}, no wait: \boxed{4}", "4") == 1.0
    assert R.math_rule_reward(r"first \boxed{4}, no wait: \boxed{3}", "4") == 0.0


def test_math_nested_braces():
    assert R.last_boxed(r"x \boxed{\frac{\sqrt{2}}{2}} y") == r"\frac{\sqrt{2}}{2}"
    assert R.last_boxed(r"\boxed{\{1, 2\}} and \boxed{3} then \boxed{4") == "3"  # last *complete* box
    assert R.last_boxed(r"\boxed{1} or \boxed 7.") == "7."
    assert R.math_rule_reward(r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}") == 1.0


@pytest.mark.parametrize("response", [
    r"\boxed{\frac{", r"\boxed{}", r"\boxed{)(*&^%$#}", r"\boxed{\frac{1}{0}}", r"\boxed{\\\\}}}",
    "\\boxed{" * 50, r"\boxed{\begin{matrix}}", None,
])
def test_math_garbage_gets_0_without_raising(response):
    assert R.math_rule_reward(response, "1") == 0.0


def test_math_from_worker_threads():
    cases = [(r"\boxed{\frac{1}{2}}", "0.5", 1.0), (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
             (r"\boxed{3}", "4", 0.0), ("no box", "4", 0.0)] * 2
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: R.math_rule_reward(c[0], c[1]), cases))
    assert got == [c[2] for c in cases]


def test_math_degenerate_repetition_is_fast():
    t0 = time.monotonic()
    assert R.math_rule_reward("\\boxed{" * 20000 + "1" + "}" * 19999, "1") == 1.0  # innermost box
    assert R.math_rule_reward("\\boxed{" * 20000, "1") == 0.0
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("in_thread", [False, True])
def test_math_runaway_answer_is_cut_off(in_thread):
    """9^(9^(9^9)) sends sympy into a big-int power that only a signal interrupts."""
    out = {}

    def check():
        t0 = time.monotonic()
        out["r"] = R.math_rule_reward(r"\boxed{9^{9^{9^{9}}}}", "1", timeout_s=1.0)
        out["dt"] = time.monotonic() - t0

    if in_thread:
        R.math_rule_reward(r"\boxed{1}", "1")  # start a helper outside the timed part
        th = threading.Thread(target=check)
        th.start()
        th.join()
    else:
        check()
    assert out["r"] == 0.0 and out["dt"] < 1.0 + R._HELPER_SLACK_S + SLACK
    assert R.math_rule_reward(r"\boxed{2}", "2") == 1.0  # the timer was disarmed


# --------------------------------------------------------------------------------------
# code_sandbox: correctness


def test_extract_code_takes_last_python_block():
    text = "```python\nprint(1)\n```\nthen\n```\nprint(2)\n```\nout:\n```text\n2\n```\n"
    assert R.extract_code(text).strip() == "print(2)"
    assert R.extract_code("no code here") is None


@needs_root
def test_stdin_stdout_pairs():
    tests = [{"stdin": "1 2\n", "stdout": "3\n"}, {"input": "10 -4", "output": "6"}]
    assert R.code_sandbox_reward(py("a, b = map(int, input().split())\nprint(a + b)"), tests) == 1.0
    assert R.code_sandbox_reward(py("a, b = map(int, input().split())\nprint(a - b)"), tests) == 0.0
    assert R.code_sandbox_reward(py("print(3)"), tests) == 0.0  # first passes, second fails
    assert R.code_sandbox_reward(py("print(3)\nraise SystemExit(1)"), tests[:1]) == 0.0  # exit status counts


@needs_root
def test_python_test_code():
    sol = py("def add(a, b):\n    return a + b")
    assert R.code_sandbox_reward(sol, "assert add(1, 2) == 3\nassert add(-1, 1) == 0") == 1.0
    assert R.code_sandbox_reward(sol, "def test_add():\n    assert add(2, 2) == 4\n") == 1.0
    assert R.code_sandbox_reward(sol, "def test_add():\n    assert add(2, 2) == 5\n") == 0.0
    assert R.code_sandbox_reward(sol, "assert add(1, 2) == 4") == 0.0
    # a solution that exits early never reaches the end of the tests
    assert R.code_sandbox_reward(py("import sys\nsys.exit(0)"), "assert add(1, 2) == 4") == 0.0
    assert R.code_sandbox_reward(py("import os\nos._exit(0)"), "def test_a():\n    assert False\n") == 0.0


@needs_root
def test_json_string_test_cases():
    sol = py("print(int(input()) * 2)")
    assert R.code_sandbox_reward(sol, json.dumps([{"input": "4", "output": "8"}])) == 1.0
    assert R.code_sandbox_reward(sol, json.dumps({"inputs": ["4\n", "5\n"], "outputs": ["8\n", "10\n"]})) == 1.0
    assert R.code_sandbox_reward(sol, json.dumps([{"input": "4", "output": "9"}])) == 0.0
    fn = py("def double(x):\n    return 2 * x")
    assert R.code_sandbox_reward(fn, json.dumps("assert double(4) == 8")) == 1.0


def test_no_code_block_gets_0():
    assert R.code_sandbox_reward("I would print 3.", [{"stdin": "", "stdout": "3"}]) == 0.0
    assert R.code_sandbox_reward("```bash\necho 3\n```", [{"stdin": "", "stdout": "3"}]) == 0.0


def test_malformed_test_cases_raise():
    for bad in ("", "[]", [{"stdin": "1"}], 42):
        with pytest.raises(ValueError):
            R.code_sandbox_reward(py("print(1)"), bad)


@needs_root
def test_score_dispatches_on_seed_records():
    assert R.score("math_rule", r"\boxed{0.5}", {"ground_truth": r"\frac12", "test_cases": ""}) == 1.0
    rec = {"ground_truth": "", "test_cases": json.dumps([{"input": "", "output": "hi"}])}
    assert R.score("code_sandbox", py("print('hi')"), rec) == 1.0
    assert set(R.REWARD_FNS) == {"math_rule", "code_sandbox"}
    with pytest.raises(ValueError):
        R.score("nope", "x", rec)


@needs_root
def test_parallel_rewards_and_a_fork_bomb_next_door():
    """Each concurrent sandbox has its own uid, so one sample's fork bomb does not use up
    the process budget of the samples beside it."""
    good = py("print(sum(map(int, input().split())))")
    bomb = py("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    tests = [{"stdin": "1 2 3", "stdout": "6"}]
    got = R.code_sandbox_rewards([good, bomb, good, good, py("print(5)")], [tests] * 5,
                                 max_workers=3, timeout_s=TIMEOUT)
    assert got == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert sandbox_procs() == []


@needs_root
def test_score_samples_for_the_trainer():
    cfgs = {"math": ("math_rule", ["add"]), "code": ("code_sandbox", ["code"])}
    texts = [r"\boxed{3}", r"\boxed{4}", py("print(1)"), "x"]
    records = [{"tag": "add", "ground_truth": "3"}, {"tag": "add", "ground_truth": "3"},
               {"tag": "code", "test_cases": '[{"input": "", "output": "1"}]'}, {"tag": "other"}]
    reward, scored = R.score_samples(cfgs, texts, records)
    assert reward.tolist() == [1.0, 0.0, 1.0, 0.0] and scored.tolist() == [True, True, True, False]


def test_unisolated_needs_consent(monkeypatch):
    monkeypatch.setattr(S, "_isolation_missing", "simulated: no namespaces")
    with pytest.raises(RuntimeError, match="simulated: no namespaces"):
        R.code_sandbox_reward(py("print(1)"), [{"stdin": "", "stdout": "1"}])
    with pytest.warns(RuntimeWarning, match="UNISOLATED"):
        assert R.code_sandbox_reward(py("print(1)"), [{"stdin": "", "stdout": "1"}], allow_unisolated=True) == 1.0


@needs_root
def test_isolation_is_in_force():
    r = S.run_sandboxed("import os, socket\nprint(os.getuid(), os.getgid(), os.getgroups(), os.getpid(), "
                        "[n for _, n in socket.if_nameindex()], os.getcwd(), sorted(os.environ))")
    uid, gid, groups, pid, ifaces, cwd, env = r.stdout.split(" ", 6)
    assert S.SANDBOX_UID_BASE <= int(uid) < S.SANDBOX_UID_BASE + S.MAX_SANDBOXES and gid == uid
    assert groups == "[]" and pid == "2" and ifaces == "['lo']" and cwd == "/tmp/sandbox"
    assert env.strip() == "['HOME', 'LANG', 'LC_ALL', 'PATH', 'TMPDIR']"


# --------------------------------------------------------------------------------------
# code_sandbox: hostile programs


@pytest.fixture
def hostile():
    """Run a hostile solution: reward 0, within the limit, nothing left running."""
    def run(code, tests, **kw):
        t0 = time.monotonic()
        r = R.code_sandbox_reward(py(code), tests, timeout_s=TIMEOUT, **kw)
        dt = time.monotonic() - t0
        assert r == 0.0
        assert dt < TIMEOUT + SLACK, f"took {dt:.1f}s"
        assert sandbox_procs() == []
        return dt
    return run


@needs_root
def test_infinite_loop(hostile):
    hostile("while True:\n    pass", [{"stdin": "", "stdout": "done"}])


@needs_root
@pytest.mark.parametrize("code", [
    "import os\nwhile True:\n    os.fork()",
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    # children leave the process group and the session: only the PID namespace gets them
    "import os\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n    except OSError:\n        pass",
])
def test_fork_bomb(hostile, code):
    hostile(code, [{"stdin": "", "stdout": "done"}])


@needs_root
@pytest.mark.parametrize("code", [
    "x = bytearray(10 * 1024 ** 3)\nprint('done')",
    "x = []\nwhile True:\n    x.append(b'x' * 10 ** 7)",
    # many processes at just under the per-process limit: the cgroup caps their sum
    "import os\nfor _ in range(20):\n    if os.fork() == 0:\n        break\nx = b'x' * (450 << 20)\n"
    "import time\ntime.sleep(5)",
])
def test_memory_hog(hostile, code):
    hostile(code, [{"stdin": "", "stdout": "done"}])


@needs_root
@pytest.mark.parametrize("code", [
    "while True:\n    print('x' * 1000)",
    "import os\nb = b'x' * 10 ** 7\nwhile True:\n    try:\n        os.write(1, b)\n    except OSError:\n        pass",
    "import sys\nsys.stdout.write('x' * 10 ** 9)",
])
def test_huge_output(hostile, code):
    hostile(code, [{"stdin": "", "stdout": "done"}])
    r = S.run_sandboxed(code, timeout_s=TIMEOUT, max_output_bytes=1000)
    assert len(r.stdout) <= 1000


@needs_root
def test_cannot_write_trainer_files(hostile):
    # one directory outside /tmp (which the sandbox sees as it is), one inside (which it
    # sees replaced by a private tmpfs); both root-owned, mode 755 like a run directory.
    # The repo itself may live under /tmp (a CI clone): then use /var/lib for the first.
    covered = ("/tmp/", "/var/tmp/", "/dev/shm/", "/run/")
    outside = ROOT if not (ROOT + "/").startswith(covered) else "/var/lib"
    dirs = [tempfile.mkdtemp(prefix=".sandbox-write-test-", dir=outside), tempfile.mkdtemp()]
    try:
        for d in dirs:
            os.chmod(d, 0o755)
            target = os.path.join(d, "pwned.txt")
            code = (f"import os\nprint(os.path.isdir({d!r}))\n"
                    f"open({target!r}, 'w').write('x')\nprint('written')")
            hostile(code, [{"stdin": "", "stdout": "True\nwritten"}])
            assert not os.path.exists(target)
        r = S.run_sandboxed(f"open({os.path.join(dirs[0], 'f')!r}, 'w')")
        assert "PermissionError" in r.stderr  # it saw the directory; permissions stopped it
        for target in (os.path.join(ROOT, "rewards.py"), os.path.join(ROOT, "README.md")):
            before = open(target).read()  # (hidden from it when the repo is under /tmp)
            hostile(f"open({target!r}, 'a').write('pwned')\nprint('ok')", [{"stdin": "", "stdout": "ok"}])
            assert open(target).read() == before
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


@needs_root
def test_no_network(hostile):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                f"s.sendall(b'hello')\nprint('connected')")
        hostile(code, [{"stdin": "", "stdout": "connected"}])
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


@needs_root
def test_no_environment_secrets(hostile, monkeypatch):
    monkeypatch.setenv("OPD_SECRET_TOKEN", "s3cr3t")
    tests = [{"stdin": "", "stdout": "s3cr3t"}]
    hostile("import os\nprint(os.environ.get('OPD_SECRET_TOKEN'))", tests)
    # nor through the trainer's /proc/PID/environ (another PID namespace, another uid)
    hostile(f"import re\nenv = open('/proc/{os.getpid()}/environ', 'rb').read()\n"
            "print(re.search(rb'OPD_SECRET_TOKEN=(\\w+)', env).group(1).decode())", tests)


@needs_root
def test_sysv_shared_memory_dies_with_the_sandbox(hostile):
    code = ("import ctypes\nlibc = ctypes.CDLL(None)\n"
            "print(libc.shmget(0, 64 << 20, 0o1000 | 0o666))\nprint('leaked')")
    r = S.run_sandboxed(code)
    assert r.returncode == 0 and int(r.stdout.split()[0]) >= 0  # it could create one...
    with open("/proc/sysvipc/shm") as f:  # ...but not in the host's IPC namespace
        owners = {int(line.split()[7]) for line in list(f)[1:]}
    assert not owners & set(range(S.SANDBOX_UID_BASE, S.SANDBOX_UID_BASE + S.MAX_SANDBOXES))


@needs_root
@pytest.mark.parametrize("code", [
    "import os\nos.kill(os.getppid(), 9)\nprint('killed')",
    "import os\nos.killpg(0, 9)\nprint('killed')",
    "import os\nos.killpg(os.getpgid(os.getppid()), 9)\nprint('killed')",
    "import os\nos.kill(-1, 9)\nprint('killed')",
    f"import os\nos.kill({os.getpid()}, 9)\nprint('killed')",  # the trainer's pid, from outside
])
def test_cannot_kill_the_trainer(hostile, code):
    canary = subprocess.Popen(["sleep", "30"])
    try:
        hostile(code, [{"stdin": "", "stdout": "killed"}])
        assert canary.poll() is None  # an unrelated process of the trainer's survives too
    finally:
        canary.kill()
        canary.wait()
    # and we, the trainer, are obviously still here to check it


def test_numeric_literals_take_the_exact_fast_path():
    # plain numbers compare as exact rationals without sympy; anything else falls through
    assert R._as_fraction("68.0") == R._as_fraction("68") and R._as_fraction("1e3") == 1000
    assert R._as_fraction("\\frac{1}{2}") is None and R._as_fraction("1/2") is None
    assert R.math_rule_reward("\\boxed{68.0}", "68") == 1.0
    assert R.math_rule_reward("\\boxed{0.1}", "0.10000000000000001") == 0.0  # exact, not float
    assert R.math_rule_reward("\\boxed{0.5}", "\\frac{1}{2}") == 1.0    # via math-verify
