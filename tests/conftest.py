"""Shared fixtures: a tiny world built in the test session (nothing downloaded).

`tiny` holds a tokenizer, a random student, a *different* fixed teacher (briefly trained
on the task, so it has structure the student can learn), and a small prompt file."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PY = sys.executable
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    import toy

    d = tmp_path_factory.mktemp("tiny")
    records = toy.make_problems(64, seed=0)
    toy.write_jsonl(records, str(d / "train.jsonl"))
    tok = toy.build_tokenizer(toy.tokenizer_texts(records), vocab_size=320)
    toy.save_pretrained(toy.build_model(tok, seed=0), tok, str(d / "student"))
    teacher = toy.build_model(tok, seed=1)
    toy.sft(teacher, tok, records, steps=30, batch_size=32)
    toy.save_pretrained(teacher, tok, str(d / "teacher"))
    return {"dir": str(d), "student": str(d / "student"), "teacher": str(d / "teacher"),
            "train": str(d / "train.jsonl"), "tokenizer": tok}


def run_cmd(args, timeout=600, env=None):
    """Run a command from the repo root; return the CompletedProcess (text, both streams)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
