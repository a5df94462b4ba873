"""Exact resume after a crash, resume errors, and steps skipped for non-finite numbers.

The kill test runs the real script on 2 ranks, SIGKILLs every process once a checkpoint
exists, resumes with `--resume_from_checkpoint auto`, and compares every non-timing metric
of every later step with an uninterrupted run of the same seed."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PY, ROOT, TORCHRUN, run_cmd

STEPS = 6
TIMING = ("timing/", "throughput/tokens_per_s", "memory/")


def opd_args(tiny, out, *flags, launcher=(TORCHRUN, "--nproc_per_node=2")):
    return [*launcher, "opd.py", "--pretrain", tiny["student"], "--teacher.model_name_or_path", tiny["teacher"],
            "--data.file_name", tiny["train"], "--validation.file_name", tiny["train"],
            "--validation.eval_steps", "3", "--output_dir", str(out), "--rollout_batch_size", "8",
            "--num_return_sequences_in_group", "4", "--response_length", "16", "--max_steps", str(STEPS),
            "--save_steps", "2", "--student_train.lr", "1e-2", *flags]


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def latest(out):
    p = out / "checkpoints" / "latest"
    return p.read_text().strip() if p.exists() else None


@pytest.fixture(scope="module")
def killed_and_resumed(tiny, tmp_path_factory):
    """(uninterrupted run dir, killed-then-resumed run dir, metrics steps written before the kill)."""
    base = tmp_path_factory.mktemp("resume")
    whole, crashed = base / "whole", base / "crashed"
    r = run_cmd(opd_args(tiny, whole))
    assert r.returncode == 0, r.stderr[-4000:]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(opd_args(tiny, crashed, "--save_total_limit", "2"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while latest(crashed) is None and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # torchrun and both ranks, wherever they are
    p.wait()
    before = [r["step"] for r in rows(crashed)]
    assert latest(crashed) is not None and before[-1] < STEPS, f"not killed mid-run: {before}"

    r = run_cmd(opd_args(tiny, crashed, "--resume_from_checkpoint", "auto", "--save_total_limit", "2"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stdout, r.stdout[-2000:]
    return whole, crashed, before


def test_kill_and_resume_is_bit_exact(killed_and_resumed):
    whole, crashed, before = killed_and_resumed
    a, b = rows(whole), rows(crashed)
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(STEPS + 1))  # no step twice
    for x, y in zip(a, b):
        keys = [k for k in x if not k.startswith(TIMING)]
        assert set(keys) <= set(y)
        assert {k: x[k] for k in keys} == {k: y[k] for k in keys}, f"step {x['step']} differs"
    # the final weights are the same bits, and the checkpoints are complete
    wa = load_file(str(whole / "checkpoints" / f"step_{STEPS}" / "model.safetensors"))
    wb = load_file(str(crashed / "checkpoints" / f"step_{STEPS}" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert latest(crashed) == f"step_{STEPS}"
    # save_total_limit 2: the two newest; no half-written save left behind
    assert sorted(os.listdir(crashed / "checkpoints")) == ["latest", f"step_{STEPS - 2}", f"step_{STEPS}"]


def resume_error(tiny, out, *flags, ckpt):
    r = run_cmd(opd_args(tiny, out, "--resume_from_checkpoint", str(ckpt), *flags, launcher=(PY,)))
    assert r.returncode == 2, r.stderr[-3000:]
    return r.stderr


def test_resume_errors_name_what_differs(killed_and_resumed, tiny, tmp_path):
    whole = killed_and_resumed[0]
    ckpt = whole / "checkpoints" / "step_4"
    err = resume_error(tiny, tmp_path / "a", ckpt=ckpt)  # 1 rank, written by 2
    assert "written by 2 rank(s), this run has 1" in err, err

    broken = tmp_path / "step_4"
    shutil.copytree(ckpt, broken)
    os.remove(broken / "state" / ".metadata")
    err = resume_error(tiny, tmp_path / "b", ckpt=broken)
    assert "not a complete checkpoint: missing state/.metadata" in err, err

    err = resume_error(tiny, tmp_path / "c", ckpt=str(ckpt) + ".tmp")
    assert "a save that never finished" in err, err


def test_another_model_is_refused(killed_and_resumed, tiny, tmp_path):
    import toy

    other = tmp_path / "wider"
    toy.save_pretrained(toy.build_model(tiny["tokenizer"], hidden_size=96), tiny["tokenizer"], str(other))
    ckpt = killed_and_resumed[0] / "checkpoints" / "step_4"
    r = run_cmd([TORCHRUN, "--nproc_per_node=2", *opd_args(tiny, tmp_path / "d", "--pretrain", str(other),
                                                            "--resume_from_checkpoint", str(ckpt), launcher=())])
    assert r.returncode != 0
    assert "was written for another model: parameter" in r.stderr and "96" in r.stderr, r.stderr[-3000:]


def test_interrupted_save_never_becomes_latest(tmp_path):
    import checkpoint

    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_2" / "state").mkdir(parents=True)
    for name in ("trainer_state.json", "config.json", "state/.metadata"):
        (ckpts / "step_2" / name).write_text("{}")
    checkpoint._write_latest(str(ckpts), "step_2")
    (ckpts / "step_4.tmp").mkdir()  # a save killed half-way
    assert checkpoint.resolve("auto", str(tmp_path)) == str(ckpts / "step_2")
    assert checkpoint.resolve("auto", str(tmp_path / "elsewhere")) is None  # nothing to resume: fresh
    assert [s for s, _ in checkpoint.steps_saved(str(ckpts))] == [2]


def poisoned_teacher(tiny, path):
    """The tiny teacher with NaN in its final norm: every log-prob it gives is NaN."""
    shutil.copytree(tiny["teacher"], path)
    w = load_file(os.path.join(path, "model.safetensors"))
    w["model.norm.weight"] = torch.full_like(w["model.norm.weight"], float("nan"))
    save_file(w, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return str(path)


def test_non_finite_teacher_skips_steps_then_stops(tiny, tmp_path):
    out = tmp_path / "run"
    teacher = poisoned_teacher(tiny, tmp_path / "nan-teacher")
    r = run_cmd(opd_args(tiny, out, "--teacher.model_name_or_path", teacher, "--save_steps", "1",
                         "--max_consecutive_skips", "2", "--validation.eval_steps", "0"))
    assert r.returncode != 0, r.stderr[-3000:]  # torchrun: 1 when a rank fails (opd exits 2)
    assert "2 steps in a row had non-finite numbers (non-finite teacher log-prob" in r.stderr, r.stderr[-3000:]
    assert "last good checkpoint is" in r.stderr and "step_1" in r.stderr
    assert [(m["step"], m["train/skipped_steps"]) for m in rows(out)] == [(1, 1), (2, 2)]
    assert "optimizer step skipped (non-finite teacher log-prob" in r.stdout
    # the weights did not move: the saved student is the initial one, bit for bit
    saved = load_file(str(out / "checkpoints" / "step_1" / "model.safetensors"))
    start = load_file(os.path.join(tiny["student"], "model.safetensors"))
    assert set(saved) == set(start) and all(torch.equal(saved[k], start[k]) for k in start)
    assert latest(out) == "step_1"


def test_auto_with_no_checkpoint_starts_fresh(tiny, tmp_path):
    """A preemptible job relaunched with the same command after dying before its first save."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "train/loss": 9.0}\n{"step": 2, "train/lo')  # cut by a kill
    r = run_cmd(opd_args(tiny, out, "--resume_from_checkpoint", "auto", "--max_steps", "1",
                         "--validation.eval_steps", "0", launcher=(PY,)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no checkpoint to resume from; starting fresh" in r.stdout
    assert [m["step"] for m in rows(out)] == [1] and rows(out)[0]["train/loss"] != 9.0
    assert latest(out) == "step_1"
