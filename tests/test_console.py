"""The console shows opd's own lines and errors; library output goes to output_dir/logs."""

import re
import textwrap

from conftest import PY, TORCHRUN, run_cmd

# Lines that vLLM, torch and Python warnings print in every run of the script here.
CHATTER = [r"WARNING \d\d-\d\d .*\[\w+\.py:\d+\]",  # vLLM's logger
           r"Loading safetensors checkpoint shards",  # a tqdm bar (vLLM)
           r"FutureWarning"]                           # a Python warning (torch, via vLLM)


def tiny_args(tiny, out):
    return ["opd.py", "--pretrain", tiny["student"], "--teacher.model_name_or_path", tiny["teacher"],
            "--data.file_name", tiny["train"], "--output_dir", str(out), "--max_steps", "2",
            "--rollout_batch_size", "8", "--num_return_sequences_in_group", "2", "--response_length", "8"]


def chatter_in(text):
    return [p for p in CHATTER if re.search(p, text)]


def test_default_console_is_opd_lines_only_and_chatter_goes_to_rank_logs(tiny, tmp_path):
    out = tmp_path / "run"
    r = run_cmd([TORCHRUN, "--nproc_per_node=2", *tiny_args(tiny, out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    console = r.stdout + r.stderr
    assert "step    2/2 | kl" in r.stdout and "opd: pure OPD, 2 rank(s)" in r.stdout
    assert chatter_in(console) == [], console[-5000:]
    assert "[rank1]" not in console, console[-5000:]  # torch's C++ warnings, prefixed per rank
    for rank in (0, 1):  # each rank's library output is in its own file, after a header line
        log = (out / "logs" / f"rank{rank}.log").read_text()
        assert log.startswith("==== ") and f"rank {rank}: opd.py" in log.splitlines()[0]
        assert chatter_in(log) == (CHATTER if rank == 0 else [CHATTER[0], CHATTER[2]]), log[-3000:]
        assert "step    2/2" not in log


def test_verbose_puts_library_output_on_the_console(tiny, tmp_path):
    out = tmp_path / "run"
    r = run_cmd([PY, *tiny_args(tiny, out), "--verbose"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "step    2/2 | kl" in r.stdout
    assert chatter_in(r.stdout + r.stderr) == CHATTER, (r.stdout + r.stderr)[-5000:]
    assert not (out / "logs").exists()


def test_a_config_error_is_one_line_on_the_console(tiny, tmp_path):
    r = run_cmd([PY, *tiny_args(tiny, tmp_path / "run"), "--rollout_batch_size", "0"], timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stderr.startswith("opd: error: "), r.stderr[-3000:]
    assert "Traceback" not in r.stderr


def test_a_crash_shows_its_traceback_and_where_the_library_log_is(tmp_path):
    """The mechanism alone (no vLLM): native writes to fd 2, Python warnings, loggers (with
    no handler, or one set up after the switch), tqdm-style writes to sys.stderr and prints go
    to the file; opd's lines and an uncaught exception's traceback reach the console, which
    names the log."""
    script = textwrap.dedent(f"""
        import logging, os, sys, warnings
        import logs
        logs.quiet_console(0)
        print("opd line 1", file=logs.console)
        os.write(2, b"native chatter\\n")
        warnings.warn("python chatter")
        logging.getLogger("math_verify").warning("lastresort chatter")  # no handler anywhere yet
        logging.basicConfig(stream=sys.stderr)
        logging.getLogger("lib").warning("logger chatter")
        sys.stderr.write("bar chatter\\n")
        logs.library_log_to({str(tmp_path)!r}, 0)
        print("more chatter")
        print("opd line 2", file=logs.console)
        raise RuntimeError("boom")
        """)
    r = run_cmd([PY, "-c", script])
    console = r.stdout + r.stderr
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert r.returncode == 1
    assert r.stdout == f"opd line 1\nlibrary output: {tmp_path}/logs/rank<R>.log (--verbose shows it here)\n" \
                       "opd line 2\n", console
    assert "RuntimeError: boom" in r.stderr and "chatter" not in console, console
    assert f"library output (warnings, vLLM, torch) is in {tmp_path}/logs/rank0.log" in r.stderr
    for line in ["native chatter", "python chatter", "lastresort chatter", "logger chatter", "bar chatter",
                 "more chatter", "RuntimeError: boom"]:
        assert line in log, log
    assert "opd line" not in log
