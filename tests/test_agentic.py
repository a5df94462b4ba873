"""Agentic mode end to end: the real script on multi-turn episodes, tiny and quick."""

import json

import pytest
import yaml

from conftest import PY, ROOT, TORCHRUN, run_cmd


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The agentic toy world's quick build: its tokenizer and layout, barely trained models."""
    import toy_agentic

    return toy_agentic.prepare(str(tmp_path_factory.mktemp("agentic")), quick=True)


def write_config(tmp_path, world, **over):
    """configs/agentic_toy.yaml pointed at the quick world, small, with `over` on top."""
    with open(f"{ROOT}/configs/agentic_toy.yaml") as f:
        cfg = yaml.safe_load(f)
    cfg.update(pretrain=f"{world}/student", rollout_batch_size=4, num_return_sequences_in_group=2, max_steps=2,
               output_dir=str(tmp_path / "run"))
    cfg["teacher"] = {**cfg["teacher"], "model_name_or_path": f"{world}/teacher"}
    cfg["val_env_manager"]["num_env_groups"] = 2
    cfg["validation"] = {"eval_steps": 2}
    if over.get("custom_envs"):  # replaces the named envs only
        over["custom_envs"] = {**cfg["custom_envs"], **over["custom_envs"]}
    cfg.update(over)
    path = tmp_path / "agentic.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_config_plays_the_games_the_world_was_built_for():
    import toy_agentic

    with open(f"{ROOT}/configs/agentic_toy.yaml") as f:
        cfg = yaml.safe_load(f)
    assert cfg["custom_envs"] == toy_agentic.ENVS
    assert cfg["prompt_length"] + cfg["response_length"] == toy_agentic.MAX_LEN


def test_two_teachers_routed_by_env_tag_on_their_own_ranks(world, tmp_path):
    teachers = {"g": {"model_name_or_path": f"{world}/teacher", "tag_included": ["guess"], "device_mapping": [0]},
                "n": {"model_name_or_path": f"{world}/student", "tag_included": ["nim"], "device_mapping": [1],
                      "opd_kl_coef": 0.5}}
    cfg = write_config(tmp_path, world, teacher=teachers)
    r = run_cmd([TORCHRUN, "--nproc_per_node=2", "opd.py", "--config", cfg])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = metrics(tmp_path)
    first, steps = rows[0], [row for row in rows if "train/loss" in row]
    assert first["step"] == 0 and {"val/success", "val/guess/success", "val/nim/success", "val/teacher_success",
                                   "val/guess/teacher_success", "val/nim/teacher_success"} <= set(first)
    assert len(steps) == 2
    for row in steps:
        # tags take turns over the batch: half the episodes go to each teacher
        assert row["teacher/g/routed_frac"] == 0.5 and row["teacher/n/routed_frac"] == 0.5, row
        assert row["timing/teacher/g_s"] > 0 and row["timing/teacher/n_s"] > 0
        for tag in ("guess", "nim"):
            assert 0 <= row[f"env/{tag}/success"] <= 1 and 1 <= row[f"env/{tag}/turns"] <= 6
        # every token is scored by exactly one teacher: the total is a token-weighted mean of
        # g's KL and n's KL times its coefficient 0.5
        parts = sorted([row["teacher/g/reverse_kl"], 0.5 * row["teacher/n/reverse_kl"]])
        assert parts[0] - 1e-5 <= row["train/reverse_kl"] <= parts[1] + 1e-5, (row, parts)
    assert "validation success, before and after:" in r.stdout and "guess" in r.stdout


def test_teacher_validation_with_a_group_member_that_plays_no_episode(world, tmp_path):
    """One teacher on both ranks and one validation episode: rank 1 plays none, yet must
    join every collective decode of the teacher's group (no hang, one result)."""
    cfg = write_config(tmp_path, world, val_env_manager={"tags": ["guess"], "num_env_groups": 1}, max_steps=1)
    r = run_cmd([TORCHRUN, "--nproc_per_node=2", "opd.py", "--config", cfg], timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    first = metrics(tmp_path)[0]
    assert first["step"] == 0 and first["val/guess/teacher_success"] in (0.0, 1.0) and "val/nim/success" not in first


@pytest.mark.parametrize("variant", ["mixed", "plain_rl"])
def test_mixed_and_plain_rl_train_on_the_env_reward(world, tmp_path, variant):
    over = {"use_opd": True} if variant == "mixed" else {"teacher": {}}
    cfg = write_config(tmp_path, world, **over)
    r = run_cmd([TORCHRUN, "--nproc_per_node=2", "opd.py", "--config", cfg, "--validation.eval_steps", "0"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert ("mixed (RL + OPD) (agentic)" if variant == "mixed" else "plain RL (agentic)") in r.stdout
    rows = metrics(tmp_path)
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["train/response_len"] > 0 and ("teacher/default/reverse_kl" in row) == (variant == "mixed")
        for tag in ("guess", "nim"):  # the reward the advantage is built from is the env's
            assert row[f"reward/{tag}/mean"] == pytest.approx(row[f"env/{tag}/reward"]), row
        if variant == "mixed":  # the KL term always gives a gradient
            assert row["train/grad_norm"] > 0


def test_teacher_equal_to_student_gives_zero_kl_on_multi_turn_rows(world, tmp_path):
    cfg = write_config(tmp_path, world, teacher={"model_name_or_path": f"{world}/student"})
    r = run_cmd([PY, "opd.py", "--config", cfg, "--max_steps", "1", "--validation.eval_steps", "0"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    row = metrics(tmp_path)[0]
    assert row["env/guess/turns"] > 1 or row["env/nim/turns"] > 1, row  # really multi-turn
    assert abs(row["train/reverse_kl"]) < 1e-4, row
    assert abs(row["train/is_ratio_mean"] - 1) < 1e-4, row


@pytest.mark.parametrize("yaml_over, flags, message", [
    ({"custom_envs": {"guess": {"env_type": "sudoku"}}}, [],
     "custom_envs.guess.env_type: unknown env_type 'sudoku'; known: guess_number, nim"),
    ({"train_env_manager": {"tags": ["guess", "chess"]}}, [],
     "train_env_manager.tags: 'chess' has no env in custom_envs"),
    ({}, ["--custom_envs.nim.max_turns", "0"], "custom_envs.nim.max_turns must be >= 1"),
    ({}, ["--custom_envs.guess.max_tokens_per_turn", "300"], "custom_envs.guess.max_tokens_per_turn=300 does not fit"),
    ({}, ["--prompt_length", "8"], "custom_envs.guess: the first observation (seed 0) is longer than prompt_length=8"),
    ({"custom_envs": {"guess": {"env_type": "guess_number", "env_config": {"low": 9, "high": 3}}}}, [],
     "custom_envs.guess.env_config: guess_number rejects"),
    ({"custom_envs": {}}, [], "pure_opd_pipeline_type=agentic needs custom_envs"),
    ({"custom_envs": {"dice": {"max_turns": 3}}}, [], "custom_envs.dice.env_type is required"),
    ({"train_env_manager": {"tags": ["guess"], "num_env_groups": 8}}, [], "unknown key 'num_env_groups'"),
])
def test_bad_agentic_config_is_a_clear_start_up_error(world, tmp_path, yaml_over, flags, message):
    cfg = write_config(tmp_path, world, **yaml_over)
    r = run_cmd([PY, "opd.py", "--config", cfg, *flags], timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr and message in r.stderr, r.stderr[-3000:]


def test_world_layout_and_expert_rows(world):
    """The quick build has the cached layout, and the SFT rows train on expert moves only:
    a random move (noise) stays in the row with no loss on it."""
    import os

    import toy_agentic
    from transformers import AutoTokenizer

    assert {"teacher", "student", "info.json", "DONE"} <= set(os.listdir(world))
    tok = AutoTokenizer.from_pretrained(f"{world}/teacher")
    pairs = [("guess", 5), ("nim", 5)]
    clean = toy_agentic.expert_rows(tok, pairs, noise=0.0, seed=0)
    noisy = toy_agentic.expert_rows(tok, pairs, noise=1.0, seed=0)
    for (ids, mask), (nids, nmask) in zip(clean, noisy):
        assert len(mask) == len(ids) and sum(mask) > 0       # every expert action is trained on
        assert sum(nmask) == 0 and len(nids) > 0             # random moves are played, not trained on
    text = tok.decode(clean[0][0])
    assert text.startswith("<|im_start|>user\nGuess my number from 1 to 20.") and "<|im_start|>assistant\n10" in text


def test_resumed_agentic_run_continues_exactly(world, tmp_path):
    """Resume from step 2 of a 4-step run: the env seed stream, every turn's sampler seeds and
    the greedy validation episodes replay, so steps 3 and 4 equal the uninterrupted run's."""
    import shutil

    cfg = write_config(tmp_path, world, max_steps=4, save_steps=2)
    r = run_cmd([PY, "opd.py", "--config", cfg])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    whole = metrics(tmp_path)
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints" / "step_4")
    (run / "checkpoints" / "latest").write_text("step_2\n")  # as if killed during step 3
    r = run_cmd([PY, "opd.py", "--config", cfg, "--resume_from_checkpoint", "auto"])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
    again = metrics(tmp_path)
    assert [m["step"] for m in again] == [0, 1, 2, 3, 4]
    for a, b in zip(whole, again):
        keys = [k for k in a if not k.startswith(("timing/", "throughput/tokens_per_s", "memory/"))]
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["step"]
    assert again[4]["env/guess/turns"] > 0 and "val/success" in again[4]
