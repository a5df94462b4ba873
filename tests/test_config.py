"""Config: YAML presets, flag overrides, --help from the docstrings."""

import glob
import os

import pytest

import opd
from conftest import PY, ROOT, run_cmd


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_preset_parses(path):
    cfg = opd.parse_config(["--config", path])
    assert cfg.config == path and cfg.max_steps >= 1


def test_flags_override_the_yaml_and_nest_with_dots(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("max_steps: 7\nseed: 3\nstudent_train:\n  lr: 0.5\n  clip: null\n")
    cfg = opd.parse_config(["--config", str(p), "--seed", "9", "--student_train.lr", "1e-6",
                            "--output_dir", "runs/x"])
    assert (cfg.max_steps, cfg.seed, cfg.student_train.lr, cfg.output_dir) == (7, 9, 1e-6, "runs/x")
    assert cfg.student_train.clip is None          # null in YAML = plain importance sampling
    assert cfg.student_train.micro_batch_size == opd.StudentTrain().micro_batch_size


def test_help_shows_field_docstrings():
    r = run_cmd([PY, "opd.py", "--help"], timeout=120)
    assert r.returncode == 0
    assert "--student_train.lr" in r.stdout and "AdamW learning rate" in r.stdout
    assert "--max_steps" in r.stdout and "--teacher.default.model_name_or_path" in r.stdout


def test_one_teacher_or_many(tmp_path):
    # the issue-2 form: one teacher's fields directly, and --teacher.<field> flags for it
    cfg = opd.parse_config(["--teacher.opd_kl_coef", "0.5"])
    assert list(cfg.teacher) == ["default"] and cfg.teacher["default"].opd_kl_coef == 0.5
    p = tmp_path / "one.yaml"
    p.write_text("teacher:\n  model_name_or_path: /m\n  tag_included: [add]\n")
    cfg = opd.parse_config(["--config", str(p)])
    assert cfg.teacher["default"].model_name_or_path == "/m" and cfg.teacher["default"].tag_included == ["add"]
    p.write_text("teacher:\n  math: {model_name_or_path: /a, tag_included: [add], device_mapping: [0]}\n"
                 "  general: {model_name_or_path: /b, opd_kl_coef: 0.3, device_mapping: [1]}\n")
    cfg = opd.parse_config(["--config", str(p), "--teacher.general.opd_kl_coef", "0.7"])
    assert list(cfg.teacher) == ["math", "general"]
    assert cfg.teacher["math"].device_mapping == [0] and cfg.teacher["general"].opd_kl_coef == 0.7
    p.write_text("teacher: null\n")
    assert opd.parse_config(["--config", str(p)]).teacher == {}


def test_toy_preset_is_the_no_flag_default():
    import dataclasses

    preset = opd.parse_config(["--config", os.path.join(ROOT, "configs", "toy.yaml")])
    preset.config = None
    assert dataclasses.asdict(preset) == dataclasses.asdict(opd.parse_config([]))


def test_own_student_keeps_a_teacher_the_user_named(tmp_path):
    import config

    toy_teacher = opd.TeacherConfig().model_name_or_path
    argv = ["--pretrain", "/my/student", "--teacher.model_name_or_path", toy_teacher]
    cfg = opd.parse_config(argv)
    config.apply_toy_defaults(cfg, config.given_keys(argv))
    assert list(cfg.teacher) == ["default"]  # named explicitly: kept, even though it is the default
    p = tmp_path / "c.yaml"
    p.write_text(f"pretrain: /my/student\nteacher:\n  model_name_or_path: {toy_teacher}\n")
    cfg = opd.parse_config(["--config", str(p)])
    config.apply_toy_defaults(cfg, config.given_keys(["--config", str(p)]))
    assert list(cfg.teacher) == ["default"]
    argv = ["--pretrain", "/my/student"]  # nothing said about a teacher: plain RL, as in the seed
    cfg = opd.parse_config(argv)
    config.apply_toy_defaults(cfg, config.given_keys(argv))
    assert cfg.teacher == {} and cfg.validation.file_name  # (the toy val split stays: toy data)


@pytest.mark.parametrize("flags, needle", [
    (["--teacher.model_name_or_path", ""], "exactly one teacher"),
    (["--use_opd"], "no use_opd"),
    (["--teacher.device_mapping", "0"], "on all ranks"),
])
def test_off_policy_needs_one_teacher_on_all_ranks(flags, needle):
    import config

    argv = ["--off_policy", *flags]
    cfg = opd.parse_config(argv)
    config.apply_toy_defaults(cfg, config.given_keys(argv))
    with pytest.raises(config.ConfigError, match=needle):
        config.check_config(cfg, world=2)


def test_a_real_model_is_told_which_settings_keep_toy_values():
    import config

    assert config.toy_values_notice(opd.Config()) == []  # the toy world: its own values
    real = opd.parse_config(["--config", os.path.join(ROOT, "configs", "qwen3_32b_to_8b.yaml")])
    (line,) = config.toy_values_notice(real)  # the preset sets its own lr, lengths, micro-batches
    assert "rewards=math_rule on every tag" in line and "lr" not in line and "length" not in line
    bare = opd.parse_config(["--pretrain", "/models/Qwen3-8B"])
    (line,) = config.toy_values_notice(bare)
    for key in ("student_train.lr=0.002", "prompt_length=64", "response_length=16",
                "student_train.micro_batch_size=128", "teacher.default.micro_batch_size=128"):
        assert key in line, key


def test_own_data_drops_the_toy_validation_unless_it_is_named(tmp_path):
    import config

    toy_val = opd.Validation().file_name
    for argv, kept in [(["--data.file_name", "/my/train.jsonl"], False),
                       (["--data.file_name", "/my/train.jsonl", "--validation.eval_steps", "10"], False),
                       (["--data.file_name", "/my/train.jsonl", "--validation.file_name", *toy_val], True),
                       ([], True)]:
        cfg = opd.parse_config(argv)
        config.apply_toy_defaults(cfg, config.given_keys(argv))
        assert (cfg.validation.file_name == toy_val) == kept and bool(cfg.validation.file_name) == kept, argv
    p = tmp_path / "c.yaml"
    p.write_text(f"data:\n  file_name: [/my/train.jsonl]\nvalidation:\n  file_name: {toy_val}\n")
    cfg = opd.parse_config(["--config", str(p)])
    config.apply_toy_defaults(cfg, config.given_keys(["--config", str(p)]))
    assert cfg.validation.file_name == toy_val
