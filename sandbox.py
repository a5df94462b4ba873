"""The code sandbox: run an untrusted Python program isolated for real.

Owns `run_sandboxed(program, stdin, ...) -> SandboxResult`: a throw-away process tree in
new network, PID, mount and IPC namespaces, as an unprivileged uid of its own, under
rlimits and (where writable) cgroup-v1 pids/memory limits, with wall-clock teardown of
everything it started. `ISOLATION` states exactly what is in force; rewards.py decides
what to run and what counts as passing.

Simplified: Python only; built from Linux primitives (namespaces, rlimits, setuid to a
slot uid), not a container runtime or a seccomp filter, so it needs root.
"""

import ctypes
import json
import math
import os
import queue
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass

# --------------------------------------------------------------------------------------
# Isolation

ISOLATION = """\
Each test case of `code_sandbox_reward` runs as a fresh `python3 -I -S -B prog.py` process
tree, built by a small root launcher and torn down by the kernel. The interpreter is the
trainer's own when an unprivileged uid can execute it, else /usr/bin/python3.

* Identity: the program runs as an unprivileged uid/gid of its own (SANDBOX_UID_BASE + a slot
  number, one slot per concurrently running sandbox, no supplementary groups), with
  PR_SET_NO_NEW_PRIVS (setuid binaries such as su/mount cannot raise it again). It can
  therefore not write to the run's files, checkpoints or anything else the trainer owns,
  as long as those are not world-writable (keep run dirs 755/700, not 777), and cannot
  signal the trainer or other sandboxes.
* Namespaces (unshare), four new ones:
  - network: only a loopback device, down: no TCP/UDP anywhere, not even 127.0.0.1;
    abstract unix sockets are private too;
  - PID: it sees and can signal only its own processes; when the sandbox's init exits the
    kernel kills everything left in it, children that called setsid or double-forked too;
  - mount: a fresh /proc, and private size-limited tmpfs (TMPFS_MB) over /tmp, /var/tmp,
    /dev/shm and /run, the host's world-writable places: nothing it writes survives it,
    and unix sockets in those directories are out of reach;
  - IPC: SysV shared memory, semaphores and message queues die with it instead of
    staying in the host's RAM.
* Working directory: /tmp/sandbox inside that private tmpfs, owned by the sandbox uid,
  mode 700, HOME and TMPDIR point there; it vanishes with the namespace. The trainer-side
  files (program, stdin, captured output) live in a root-only mkdtemp dir, removed after.
* Environment: scrubbed to PATH, LANG, LC_ALL, HOME, TMPDIR (no trainer secrets); -I also
  ignores PYTHON* variables and user site-packages; -S: standard library only.
* Resource limits (setrlimit): RLIMIT_CPU = ceil(timeout_s)+1 s, RLIMIT_AS = memory_mb,
  RLIMIT_FSIZE = max_output_bytes (also caps the captured stdout/stderr files),
  RLIMIT_NPROC = max_procs (enforced because the uid is not root and is the slot's
  alone), RLIMIT_NOFILE = 256, RLIMIT_CORE = 0; nice +10.
* cgroup v1, best effort (used when /sys/fs/cgroup/{pids,memory} can be written): a child
  cgroup of the trainer's own per slot with pids.max = max_procs+2 and
  memory.limit_in_bytes = memory_mb + 256 MiB for the whole sandbox (all its processes and
  its tmpfs together), removed after the run. Without it the sandbox as a whole can reach
  max_procs x memory_mb (each process is held to memory_mb only).
* Wall clock: the trainer waits at most timeout_s (pidfd), then SIGKILLs the launcher's
  process group, which takes the sandbox's init and with it the whole PID namespace; the
  group is killed in a finally on success too, and any process still owning the slot's uid
  is killed before the slot is reused.
* Output: stdout/stderr go to files capped by RLIMIT_FSIZE; the trainer reads at most
  max_output_bytes of stdout (64 KiB of stderr).
Not covered: CPU shares beyond nice (no cpu cgroup); reading world-readable files of the
host (the rest of the filesystem is visible, just not writable); pathname unix sockets
outside the covered directories that accept anyone; kernel exploits (no seccomp filter).
Without root or namespace support the first call raises RuntimeError naming what is
missing, unless allow_unisolated=True (then: rlimits, timeouts, process-group kill, scrubbed
env and a temp dir only, same uid as the trainer, so RLIMIT_NPROC counts all of that user's
processes and network and the trainer's files are reachable; with a loud warning)."""

SANDBOX_UID_BASE = 1_000_000  # uids/gids SANDBOX_UID_BASE .. +MAX_SANDBOXES-1; not in /etc/passwd
MAX_SANDBOXES = 64  # concurrent sandboxes; more callers wait for a free slot
SANDBOX_NICE = 10
TMPFS_MB = 64  # size of each private tmpfs (/tmp, /var/tmp, /dev/shm, /run)
_SETUP_FAILED = 125  # launcher exit status when it could not build the sandbox
_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"

_slots: "queue.LifoQueue[int]" = queue.LifoQueue()
for _s in reversed(range(MAX_SANDBOXES)):
    _slots.put(_s)


@dataclass
class SandboxResult:
    returncode: int  # the program's exit status; 128+N when killed by signal N; -9 at the time limit
    stdout: str
    stderr: str
    timed_out: bool
    elapsed_s: float


def run_sandboxed(program: str, stdin: str = "", *, timeout_s: float = 5.0, memory_mb: int = 512,
                  max_procs: int = 32, max_output_bytes: int = 1_000_000,
                  allow_unisolated: bool = False) -> SandboxResult:
    """Run Python source `program` with `stdin` in a sandbox (``ISOLATION``)."""
    return _run(program, stdin, _isolation_ready(allow_unisolated), timeout_s, memory_mb, max_procs,
                max_output_bytes)


def _run(program, stdin, isolate, timeout_s, memory_mb, max_procs, max_output_bytes) -> SandboxResult:
    slot = _slots.get() if isolate else None
    tmp = tempfile.mkdtemp(prefix="opd-sandbox-")  # root-only (700): the sandbox never sees it
    try:
        paths = {k: os.path.join(tmp, k) for k in ("prog.py", "stdin", "stdout", "stderr")}
        for key, text in (("prog.py", program), ("stdin", stdin)):
            with open(paths[key], "w", encoding="utf-8", errors="replace") as f:  # lone surrogates
                f.write(text)
        workdir = "/tmp/sandbox" if isolate else os.path.join(tmp, "work")
        cfg = _launcher_config(paths["prog.py"], workdir, slot, isolate, timeout_s, memory_mb,
                               max_procs, max_output_bytes)
        with open(paths["stdin"], "rb") as fin, open(paths["stdout"], "wb") as fout, \
                open(paths["stderr"], "wb") as ferr:
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", "-c", _LAUNCHER, json.dumps(cfg)],
                stdin=fin, stdout=fout, stderr=ferr, cwd=tmp, env=_sandbox_env(workdir),
                start_new_session=True)  # its own process group, killed below
            try:
                timed_out = not _wait_exit(proc, t0 + timeout_s)
            finally:
                # The launcher is not reaped yet (a zombie keeps its pid), so the group id
                # cannot have been reused by an unrelated process: safe to kill it.
                _kill_group(proc.pid)
                rc = proc.wait()
            elapsed = time.monotonic() - t0
        return SandboxResult(rc, _head(paths["stdout"], max_output_bytes), _head(paths["stderr"], 65536),
                             timed_out, elapsed)
    finally:
        if slot is not None:
            _release_slot(slot)
        shutil.rmtree(tmp, ignore_errors=True)


def _launcher_config(prog, workdir, slot, isolate, timeout_s, memory_mb, max_procs, max_output_bytes):
    cpu = math.ceil(timeout_s) + 1
    uid = SANDBOX_UID_BASE + slot if isolate else None
    return {
        "program": prog, "workdir": workdir, "isolate": isolate, "uid": uid,
        "python": _sandbox_python() if isolate else os.path.realpath(sys.executable), "nice": SANDBOX_NICE, "tmpfs_mb": TMPFS_MB,
        "rlimits": {"RLIMIT_CPU": [cpu, cpu + 1], "RLIMIT_AS": [memory_mb << 20] * 2,
                    "RLIMIT_FSIZE": [max_output_bytes] * 2, "RLIMIT_NPROC": [max_procs] * 2,
                    "RLIMIT_NOFILE": [256, 256], "RLIMIT_CORE": [0, 0]},
        "cgroups": _cgroup_dirs(slot, memory_mb, max_procs) if isolate else [],
        "env": _sandbox_env(workdir),
    }


def _sandbox_env(workdir: str) -> dict:
    return {"PATH": _ENV_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}


def _wait_exit(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait until `proc` exits or `deadline` passes, without reaping it. True if exited."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3): poll
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                return True
            time.sleep(0.005)
        return False
    try:
        return bool(select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0])
    finally:
        os.close(fd)


def _kill_group(pgid: int):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _head(path: str, n: int) -> str:
    with open(path, "rb") as f:
        return f.read(n).decode("utf-8", errors="replace")


def _release_slot(slot: int):
    """Make sure nothing of the slot's uid survives (the PID namespace should already have
    seen to it), remove its cgroups, and hand the slot back."""
    uid = SANDBOX_UID_BASE + slot
    for _ in range(100):
        pids = _pids_of_uids({uid})
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    for d in _cgroup_dirs(slot, 0, 0):
        try:
            os.rmdir(d[0])
        except OSError:
            pass
    _slots.put(slot)


def _pids_of_uids(uids) -> list[int]:
    """Processes whose real uid is in `uids`, from /proc/*/status (not the owner of
    /proc/PID, which turns to root for a process that made itself non-dumpable)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
            except (OSError, StopIteration, ValueError):
                continue
            if uid in uids:
                pids.append(int(name))
    return pids


def _cgroup_dirs(slot, memory_mb, max_procs) -> list:
    """[(dir, {knob: value})] for a per-slot child of the trainer's own v1 pids and memory
    cgroups (a child, so the sandbox stays inside whatever limits the trainer is under)."""
    out = []
    try:
        with open("/proc/self/cgroup") as f:
            own = {ctrl: path for _, ctrls, path in (line.rstrip("\n").split(":", 2) for line in f)
                   for ctrl in ctrls.split(",")}
    except OSError:
        return out
    knobs = {"pids": {"pids.max": max_procs + 2},  # + the two root launcher processes
             "memory": {"memory.limit_in_bytes": (memory_mb + 256) << 20}}
    for ctrl, values in knobs.items():
        if ctrl in own and os.path.isdir(f"/sys/fs/cgroup/{ctrl}"):
            out.append((f"/sys/fs/cgroup/{ctrl}{own[ctrl].rstrip('/')}/opd_sandbox_{slot}", values))
    return out


_python_for_sandbox = None


def _sandbox_python() -> str:
    """An interpreter the sandbox uid can execute: ours if every directory on its path is
    world-searchable (a pyenv under /root is not), else the system python3."""
    global _python_for_sandbox
    if _python_for_sandbox is None:
        for cand in (os.path.realpath(sys.executable), shutil.which("python3", path="/usr/bin:/bin")):
            if cand and _world_executable(cand):
                _python_for_sandbox = cand
                break
        else:
            raise RuntimeError("no python3 that an unprivileged uid can execute "
                               f"(tried {os.path.realpath(sys.executable)} and /usr/bin/python3)")
    return _python_for_sandbox


def _world_executable(path: str) -> bool:
    parts = path.split("/")
    dirs = ["/" + "/".join(parts[1:i]) for i in range(1, len(parts))]
    try:
        return (all(os.stat(d).st_mode & stat.S_IXOTH for d in dirs)
                and os.stat(path).st_mode & stat.S_IXOTH != 0)
    except OSError:
        return False


# The launcher runs as root in a fresh interpreter (never a fork of the threaded trainer:
# no preexec_fn). Outside the namespaces it joins the cgroups and unshares; its child is
# pid 1 of the new PID namespace ("init"): it mounts /proc and the tmpfs's, writes the
# program, forks the program process, which sets rlimits, drops to the sandbox uid and
# execs python. init reaps everything and exits with the program's status; when it exits
# the kernel kills whatever is left in the namespace.
_LAUNCHER = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

def fail(what):
    os.write(2, b"sandbox setup failed: " + what.encode() + b"\n")
    os._exit(%(setup_failed)d)

def check(ret, what):
    if ret != 0:
        fail(what + ": " + os.strerror(ctypes.get_errno()))

def status(st):
    return 128 + os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)

def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None
    check(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), "mount " + dst)

MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
src = open(cfg["program"], "rb").read()  # before /tmp is covered
os.nice(cfg["nice"])
uid, work = cfg["uid"], cfg["workdir"]
if cfg["isolate"]:
    for d, knobs in cfg["cgroups"]:  # best effort
        try:
            os.makedirs(d, exist_ok=True)
            for k, v in knobs.items():
                with open(os.path.join(d, k), "w") as f:
                    f.write(str(v))
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError:
            pass
    NEWNS, NEWPID, NEWNET, NEWIPC = 0x00020000, 0x20000000, 0x40000000, 0x08000000
    check(libc.unshare(NEWNS | NEWPID | NEWNET | NEWIPC), "unshare(NEWNS|NEWPID|NEWNET|NEWIPC)")
    init = os.fork()
    if init:
        os._exit(status(os.waitpid(init, 0)[1]))
    # pid 1 of the new namespace. Mounts must not propagate to the host: private first.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for d in ("/tmp", "/var/tmp", "/dev/shm", "/run"):
        if os.path.isdir(d) and not os.path.islink(d):
            mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=%%dm,mode=1777" %% cfg["tmpfs_mb"])
    os.mkdir(work, 0o700)
    os.chown(work, uid, uid)
else:
    os.makedirs(work, exist_ok=True)
with open(os.path.join(work, "prog.py"), "wb") as f:
    f.write(src)
child = os.fork()
if child == 0:
    try:
        os.chdir(work)
        for name, lim in cfg["rlimits"].items():
            resource.setrlimit(getattr(resource, name), tuple(lim))
        if cfg["isolate"]:
            check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        py = cfg["python"]
        os.execve(py, [py, "-I", "-S", "-B", "prog.py"], cfg["env"])
    except OSError as e:
        fail("starting the program: %%s" %% e)
while True:  # as pid 1, also reap orphans re-parented to us
    pid, st = os.wait()
    if pid == child:
        os._exit(status(st))
""" % {"setup_failed": _SETUP_FAILED}

_isolation_lock = threading.Lock()
_isolation_missing: str | None = None  # None: not checked yet; "": fully isolated; else what is missing


def _isolation_ready(allow_unisolated: bool) -> bool:
    """True if full isolation is available (checked once, by a probe program). Otherwise
    raise RuntimeError naming what is missing, or, with `allow_unisolated`, warn loudly
    and return False."""
    global _isolation_missing
    with _isolation_lock:
        if _isolation_missing is None:
            _isolation_missing = _isolation_problem() or ""
    if not _isolation_missing:
        return True
    if not allow_unisolated:
        raise RuntimeError(f"code sandbox: cannot isolate untrusted code: {_isolation_missing}. "
                           "Run the trainer as root on Linux, or pass allow_unisolated=True.")
    warnings.warn(f"code sandbox: running UNISOLATED ({_isolation_missing}): model code runs as the "
                  "trainer's user, with network and the trainer's file access", RuntimeWarning)
    return False


def _isolation_problem() -> str | None:
    """None if a probe program runs fully isolated, else what is missing."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "not root (needed for namespaces and to drop to a sandbox uid)"
    for ns in ("net", "pid", "mnt"):
        if not os.path.exists(f"/proc/self/ns/{ns}"):
            return f"kernel without {ns} namespaces"
    if not hasattr(ctypes.CDLL(None), "unshare"):
        return "libc without unshare()"
    try:
        _sandbox_python()
    except RuntimeError as e:
        return str(e)
    r = _run(_PROBE, "", True, 30, 512, 32, 65536)
    got = r.stdout.split()
    if r.returncode != 0 or len(got) != 3:
        return f"probe failed (exit {r.returncode}): {r.stderr.strip()[-300:]}"
    uid, ifaces, pid = int(got[0]), got[1], int(got[2])
    if not SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + MAX_SANDBOXES or ifaces != "lo" or pid != 2:
        return f"probe not isolated (uid {uid}, interfaces {ifaces}, pid {pid})"
    return None


_PROBE = "import os, socket\nprint(os.getuid(), ','.join(n for _, n in socket.if_nameindex()), os.getpid())\n"
