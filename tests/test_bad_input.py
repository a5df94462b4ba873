"""Bad input stops the run at start-up with one clear line, never a deep stack trace."""

import json

import pytest

import data
from conftest import PY, run_cmd


def opd_error(tiny, *flags, yaml_text=None, tmp_path=None, teacher=None):
    args = [PY, "opd.py", "--pretrain", tiny["student"], "--teacher.model_name_or_path",
            tiny["teacher"] if teacher is None else teacher, "--data.file_name", tiny["train"], "--output_dir",
            str(tmp_path / "run"), "--max_steps", "1"]
    if yaml_text is not None:
        cfg = tmp_path / "bad.yaml"
        cfg.write_text(yaml_text)
        args = [PY, "opd.py", "--config", str(cfg), *args[2:]]
    if teacher == "from-yaml":  # no --teacher.* flag: the YAML names its own teachers
        args = [a for i, a in enumerate(args) if a != "--teacher.model_name_or_path"
                and (i == 0 or args[i - 1] != "--teacher.model_name_or_path")]
    r = run_cmd(args + list(flags), timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.stderr


def test_misspelled_yaml_key_is_named_with_a_suggestion(tiny, tmp_path):
    err = opd_error(tiny, yaml_text="max_step: 3\n", tmp_path=tmp_path)
    assert "unknown key 'max_step'" in err and "did you mean 'max_steps'" in err
    assert "bad.yaml" in err


def test_unknown_nested_key_and_wrong_type(tiny, tmp_path):
    err = opd_error(tiny, yaml_text="student_train:\n  lrr: 0.1\n", tmp_path=tmp_path)
    assert "student_train: unknown key 'lrr'" in err and "'lr'" in err
    err = opd_error(tiny, yaml_text="rollout_batch_size: lots\n", tmp_path=tmp_path)
    assert "rollout_batch_size: expected int, got 'lots'" in err


def test_unknown_flag_is_rejected(tiny, tmp_path):
    err = opd_error(tiny, "--max_stepz", "3", tmp_path=tmp_path)
    assert "max_stepz" in err


def test_missing_model_path(tiny, tmp_path):
    err = opd_error(tiny, "--pretrain", str(tmp_path / "nope"), tmp_path=tmp_path)
    assert "pretrain:" in err and "nope" in err and "not a model directory" in err


def test_unreadable_and_malformed_data(tiny, tmp_path):
    err = opd_error(tiny, "--data.file_name", str(tmp_path / "missing.jsonl"), tmp_path=tmp_path)
    assert "cannot read" in err and "missing.jsonl" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "tag": "a"}\n{"prompt": "broken\n')
    err = opd_error(tiny, "--data.file_name", str(bad), tmp_path=tmp_path)
    assert f"{bad}:2: not valid JSON" in err


def test_all_prompts_too_long(tiny, tmp_path):
    err = opd_error(tiny, "--prompt_length", "3", tmp_path=tmp_path)
    assert "rollout_batch_size=64 but only 0 usable prompts" in err


def test_output_dir_of_an_earlier_run_is_not_overwritten(tiny, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    err = opd_error(tiny, tmp_path=tmp_path)
    assert "already holds a run" in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 1}\n'


# ---- data.py on its own


def write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_messages_win_over_prompt_and_may_be_a_json_string(tmp_path):
    msgs = [{"role": "user", "content": "from messages"}]
    path = write(tmp_path, [json.dumps({"prompt": "from prompt", "messages": json.dumps(msgs), "tag": "x"}),
                            json.dumps({"prompt": "only prompt", "tag": "y"})])
    recs = data.read_jsonl([path])
    assert recs[0]["messages"] == msgs
    assert recs[1]["messages"] == [{"role": "user", "content": "only prompt"}]


def test_record_without_prompt_names_file_and_line(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": "a"}), json.dumps({"tag": "x", "id": 3})])
    with pytest.raises(data.DataError, match=r"d.jsonl:2: record has neither 'prompt' nor 'messages'"):
        data.read_jsonl([path])


def test_over_long_prompts_are_skipped_and_counted(tiny, tmp_path):
    tok = tiny["tokenizer"]
    path = write(tmp_path, [json.dumps({"prompt": "1+1", "tag": "a"}),
                            json.dumps({"prompt": "12345 + 67890 = ? " * 20, "tag": "a"})])
    kept, skipped = data.encode_prompts(data.read_jsonl([path]), tok, prompt_length=24)
    assert skipped == 1 and len(kept) == 1 and len(kept[0][0]) <= 24
    assert tok.decode(kept[0][0]).endswith("assistant\n")  # rendered with the chat template


def test_batches_are_disjoint_per_rank_and_cover_the_epoch():
    items = [([i], {"id": i}) for i in range(12)]
    ranks = [data.PromptBatches(items, 4, seed=0, dp_rank=r, dp_size=2) for r in range(2)]
    seen = []
    for _ in range(3):
        a, b = (rk.next() for rk in ranks)
        assert len(a) == len(b) == 2 and not {x[1]["id"] for x in a} & {x[1]["id"] for x in b}
        seen += [x[1]["id"] for x in a + b]
    assert sorted(seen) == list(range(12))  # one epoch = every prompt once


def test_teacher_with_another_vocabulary_is_refused(tiny, tmp_path):
    import toy

    other = toy.build_tokenizer(["completely different words here"] * 50, vocab_size=290)
    toy.save_pretrained(toy.build_model(other, seed=3), other, str(tmp_path / "alien"))
    err = opd_error(tiny, "--teacher.model_name_or_path", str(tmp_path / "alien"), tmp_path=tmp_path)
    assert "teacher 'default'" in err and "different vocabulary" in err


def test_reward_configuration_errors(tiny, tmp_path):
    err = opd_error(tiny, yaml_text="rewards: {}\n", tmp_path=tmp_path, teacher="")
    assert "no teacher and no rewards" in err
    err = opd_error(tiny, "--use_opd", yaml_text="rewards: {}\n", tmp_path=tmp_path)
    assert "use_opd (mixed mode) needs at least one entry in rewards" in err
    err = opd_error(tiny, yaml_text="domain_interleave_probs: {cod: 1.0}\n", tmp_path=tmp_path)
    assert "domain_interleave_probs.cod: no reward named 'cod'" in err
    err = opd_error(tiny, yaml_text="rewards:\n  m: {type: regex}\n", tmp_path=tmp_path)
    assert "rewards.m.type: 'regex' is not one of math_rule, code_sandbox" in err
    err = opd_error(tiny, "--global_template", "qwen9", tmp_path=tmp_path)
    assert "global_template: unknown template 'qwen9'" in err


def test_record_a_reward_cannot_score_stops_the_run_at_start(tiny, tmp_path):
    bad = tmp_path / "code.jsonl"
    bad.write_text("\n".join(json.dumps({"id": f"c{i}", "prompt": "write code", "tag": "code",
                                         "test_cases": "" if i == 3 else "assert True"})
                             for i in range(8)) + "\n")
    err = opd_error(tiny, "--data.file_name", str(bad), "--rollout_batch_size", "2",
                    yaml_text="rewards:\n  code: {type: code_sandbox, tag_included: [code]}\n",
                    tmp_path=tmp_path)
    assert f"{bad}:4: code_sandbox reward: record 'c3' (tag 'code') has no 'test_cases'" in err
    assert "rewards.code.tag_included" in err

    # the default math reward scores every tag: the error says how to turn it off or scope it
    err = opd_error(tiny, "--data.file_name", str(bad), "--rollout_batch_size", "2", tmp_path=tmp_path)
    assert f"{bad}:1: math_rule reward: record 'c0' (tag 'code') has no 'ground_truth'" in err
    assert "turn it off (rewards: {})" in err and "rewards.math.tag_included" in err


def test_teacher_on_ranks_outside_the_world(tiny, tmp_path):
    err = opd_error(tiny, yaml_text="teacher:\n  t: {model_name_or_path: /x, device_mapping: [0, 3]}\n",
                    tmp_path=tmp_path, teacher="from-yaml")
    assert "teacher.t.device_mapping: [0, 3] has ranks outside the world of 1" in err


def test_distribution_kl_mode_needs_a_teacher(tiny, tmp_path):
    err = opd_error(tiny, "--opd_kl_mode", "topk", tmp_path=tmp_path, teacher="")
    assert "opd_kl_mode=topk needs a teacher to distill from" in err
    err = opd_error(tiny, "--opd_kl_mode", "topk", "--opd_kl_topk", "0", tmp_path=tmp_path)
    assert "opd_kl_topk must be >= 1, got 0" in err


def test_teacher_data_needs_an_out_path_and_exactly_one_teacher(tmp_path):
    r = run_cmd([PY, "teacher_data.py", "--max_steps", "1"])
    assert r.returncode != 0 and "--out PATH is required" in r.stderr, r.stderr[-2000:]
    out = tmp_path / "d.jsonl"
    r = run_cmd([PY, "teacher_data.py", "--teacher.model_name_or_path", "", "--out", str(out)])
    assert r.returncode == 2 and "needs exactly one teacher, the config has 0 (none)" in r.stderr, r.stderr[-2000:]
    assert not out.exists() and not (tmp_path / "d.jsonl.tmp").exists()
