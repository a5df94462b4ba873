"""Config loading: YAML presets with strict keys, then command-line flags (tyro).

`parse(Config, argv)`: `--config FILE.yaml` (if given) supplies the starting values, every
other flag overrides them (`--max_steps 5`, `--student_train.lr 1e-6`). A YAML key that
is not a field is an error that names the file and the dotted key and suggests the
closest field; a value of the wrong type names its key too. The schema itself (the
dataclasses and their docstrings, which are the --help) lives in opd.py.

Also owns the start-up checks of a parsed config (`check_config`, `check_envs`,
`check_lengths`) and
the rule that the toy world's teacher and validation split are defaults for the toy
student only (`apply_toy_defaults`).

Simplified: no config composition, no interpolation, no includes.
"""

import dataclasses
import difflib
import os
import typing
from typing import Literal

import data
import toy


class ConfigError(ValueError):
    """Bad configuration; the message names the key, flag or file."""


def from_dict(cls, values, where):
    """Build dataclass `cls` from a YAML mapping, rejecting unknown keys by name."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, val in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")
        typ = hints[key]
        kwargs[key] = (from_dict(typ, val, f"{where}.{key}") if dataclasses.is_dataclass(typ)
                       else _coerce(val, typ, f"{where}.{key}"))
    return cls(**kwargs)


def _coerce(val, typ, where):
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Union:  # Optional[X], or a union of scalars: the first that fits
        options = [a for a in args if a is not type(None)]
        if val is None and len(options) < len(args):
            return None
        for opt in options[:-1]:
            try:
                return _coerce(val, opt, where)
            except ConfigError:
                pass
        return _coerce(val, options[-1], where)
    if origin is Literal:
        if val not in args:
            raise ConfigError(f"{where}: {val!r} is not one of {', '.join(map(str, args))}")
        return val
    if origin is dict:
        if not isinstance(val, dict):
            raise ConfigError(f"{where}: expected a mapping, got {val!r}")
        return {str(k): (from_dict(args[1], v, f"{where}.{k}") if dataclasses.is_dataclass(args[1])
                         else _coerce(v, args[1], f"{where}.{k}")) for k, v in val.items()}
    if origin is list:
        items = val if isinstance(val, list) else [val]
        return [_coerce(v, args[0], where) for v in items]
    ok = {float: (int, float), int: (int,), bool: (bool,), str: (str,)}[typ]
    if not isinstance(val, ok) or (typ is not bool and isinstance(val, bool)):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {val!r}")
    return typ(val)


def _yaml_values(argv):
    """(path, mapping) of the --config YAML in argv, or (None, None)."""
    import yaml

    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                with open(path) as f:
                    return path, yaml.safe_load(f) or {}
            except OSError as e:
                raise ConfigError(f"--config: cannot read {path!r}: {e.strerror}") from None
            except yaml.YAMLError as e:
                raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
    return None, None


def parse(config_cls, argv, description=None, normalize=None):
    """--config YAML (if any) gives the defaults; every other flag overrides them."""
    import tyro

    default = config_cls()
    path, values = _yaml_values(argv)
    if path is not None:
        default = from_dict(config_cls, normalize(values) if normalize else values, path)
        default.config = path
    return tyro.cli(config_cls, args=argv, default=default, use_underscores=True,
                    description=description)


def given_keys(argv):
    """The keys the user set, by a flag or in the --config YAML: top-level ones
    ("validation") and the dotted ones under them ("validation.file_name")."""
    flags = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    _, values = _yaml_values(argv)
    values = values if isinstance(values, dict) else {}
    dotted = {f"{k}.{sub}" for k, v in values.items() if isinstance(v, dict) for sub in v}
    return flags | {f.split(".")[0] for f in flags} | set(values) | dotted


def apply_toy_defaults(cfg, given=frozenset()):
    """The toy teacher and validation split are defaults for the toy world only: a config
    that brings its own student and names no teacher (`given`: the keys the user set)
    trains with plain RL (as in the seed: no teacher configured = RL), and its own data
    has no validation unless validation.file_name is given (the toy's own, too)."""
    defaults = type(cfg)()
    if "teacher" not in given and cfg.pretrain != defaults.pretrain:
        cfg.teacher = {}
    cfg.teacher = {n: t for n, t in cfg.teacher.items() if t.model_name_or_path}  # '' = none
    if "validation.file_name" not in given and cfg.data.file_name != defaults.data.file_name:
        cfg.validation.file_name = []


def check_config(cfg, world):
    tp = cfg.student_infer.tensor_parallel_size
    if world % tp:
        raise ConfigError(f"student_infer.tensor_parallel_size={tp} does not divide the world size {world}")
    if cfg.rollout_batch_size % world:
        raise ConfigError(f"rollout_batch_size={cfg.rollout_batch_size} must be a multiple of the "
                          f"number of ranks ({world})")
    for name in ("rollout_batch_size", "num_return_sequences_in_group", "prompt_length",
                 "response_length", "max_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for where, dt in (("student_train.dtype", cfg.student_train.dtype),
                      ("student_infer.dtype", cfg.student_infer.dtype),
                      *((f"teacher.{n}.dtype", t.dtype) for n, t in cfg.teacher.items())):
        if dt not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"{where}: {dt!r} is not one of float32, bfloat16, float16")
    for name, t in cfg.teacher.items():
        if any(not 0 <= r < world for r in t.device_mapping):
            raise ConfigError(f"teacher.{name}.device_mapping: {t.device_mapping} has ranks "
                                     f"outside the world of {world}")
    agentic = cfg.pure_opd_pipeline_type == "agentic"
    if agentic:
        check_envs(cfg)
    if not cfg.teacher and not cfg.rewards and not agentic:
        raise ConfigError("no teacher and no rewards: nothing to learn from")
    if cfg.use_opd and not cfg.rewards and not agentic:
        raise ConfigError("use_opd (mixed mode) needs at least one entry in rewards")
    if cfg.off_policy:
        t = next(iter(cfg.teacher.values()), None)
        if len(cfg.teacher) != 1 or cfg.use_opd or (t.device_mapping and len(set(t.device_mapping)) < world):
            raise ConfigError("off_policy (SFT on teacher samples) needs exactly one teacher, on all "
                              f"ranks, and no use_opd; got teachers {list(cfg.teacher)}, use_opd={cfg.use_opd}")
    if cfg.opd_kl_mode != "sampled":
        if not cfg.teacher or cfg.off_policy:
            raise ConfigError(f"opd_kl_mode={cfg.opd_kl_mode} needs a teacher to distill from (and not off_policy)")
        if cfg.opd_kl_mode == "topk" and cfg.opd_kl_topk < 1:
            raise ConfigError(f"opd_kl_topk must be >= 1, got {cfg.opd_kl_topk}")
    for name in cfg.domain_interleave_probs:
        if name not in cfg.rewards:
            raise ConfigError(f"domain_interleave_probs.{name}: no reward named '{name}' "
                                     f"(domains are reward names: {', '.join(cfg.rewards)})")
    data.check_templates(cfg.global_template, cfg.tag_to_template)
    for where, path in (("pretrain", cfg.pretrain), *((f"teacher.{n}.model_name_or_path", t.model_name_or_path)
                                                      for n, t in cfg.teacher.items())):
        if not path or is_toy(path):
            continue  # no teacher (plain RL), or a toy world, built on first use
        hub_id = not os.path.exists(path) and path.count("/") == 1 and not path.startswith(("/", "."))
        if not hub_id and not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{where}: {path!r} is not a model directory (no config.json there)")


def check_envs(cfg):
    """Agentic mode: every env exists and can be made, every listed tag has one, turn limits
    are sane. (Whether a first observation fits prompt_length is checked in check_lengths.)"""
    import envs

    if not cfg.custom_envs:
        raise ConfigError("pure_opd_pipeline_type=agentic needs custom_envs (tag -> {env_type, env_config})")
    if cfg.off_policy:
        raise ConfigError("off_policy (SFT on teacher samples) is for pure_opd_pipeline_type=rlvr only")
    for where in ("train_env_manager", "val_env_manager"):
        for tag in getattr(cfg, where).tags:
            if tag not in cfg.custom_envs:
                raise ConfigError(f"{where}.tags: '{tag}' has no env in custom_envs "
                                  f"(known tags: {', '.join(sorted(cfg.custom_envs))})")
    for tag, spec in cfg.custom_envs.items():
        where = f"custom_envs.{tag}"
        if not spec.env_type:
            raise ConfigError(f"{where}.env_type is required (known: {', '.join(sorted(envs.ENVS))}, gem:<id>)")
        if spec.max_turns < 1:
            raise ConfigError(f"{where}.max_turns must be >= 1, got {spec.max_turns}")
        if spec.max_tokens_per_turn < 1:
            raise ConfigError(f"{where}.max_tokens_per_turn must be >= 1, got {spec.max_tokens_per_turn}")
        if spec.max_tokens_per_turn > cfg.response_length:
            raise ConfigError(f"{where}.max_tokens_per_turn={spec.max_tokens_per_turn} does not fit in "
                              f"response_length={cfg.response_length} (the room after the first observation "
                              "for every action and observation of an episode)")
        try:
            envs.make(spec.env_type, **spec.env_config).reset(seed=0)
        except KeyError as e:
            raise ConfigError(f"{where}.env_type: {e.args[0]}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}.env_config: {spec.env_type} rejects {spec.env_config}: {e}") from None
    if cfg.val_env_manager.num_env_groups < 1 and cfg.validation.eval_steps:
        raise ConfigError(f"val_env_manager.num_env_groups must be >= 1, got {cfg.val_env_manager.num_env_groups}")


def is_toy(path):
    """A model of one of the toy worlds (built on first use)."""
    import toy_long

    return os.path.abspath(path).startswith((toy.TOY_DIR, _agentic_toy_dir(), toy_long.TOY_DIR))


def toy_values_notice(cfg):
    """The settings that still hold values tuned for the toy world's 300k-parameter models
    when the student is not a toy: a notice naming each (empty for a toy student).

    The dataclass defaults are the toy world's, so that `python opd.py` with no flags is the
    teaching run and tests stay small; a real model brings its own config (see
    configs/qwen3_32b_to_8b.yaml), and this notice names what it left at toy values."""
    if is_toy(cfg.pretrain):
        return []
    d = type(cfg)()
    toy_tuned = {"student_train.lr": (cfg.student_train.lr, d.student_train.lr),
                 "student_train.micro_batch_size": (cfg.student_train.micro_batch_size,
                                                    d.student_train.micro_batch_size),
                 "prompt_length": (cfg.prompt_length, d.prompt_length),
                 "response_length": (cfg.response_length, d.response_length),
                 **{f"teacher.{n}.micro_batch_size": (t.micro_batch_size, d.teacher["default"].micro_batch_size)
                    for n, t in cfg.teacher.items()},
                 "rewards": (cfg.rewards, d.rewards)}
    left = [f"{k}={v if k != 'rewards' else 'math_rule on every tag'}" for k, (v, default) in toy_tuned.items()
            if v == default and not (k == "rewards" and cfg.pure_opd_pipeline_type == "agentic")]
    if not left:
        return []
    return [f"notice: {cfg.pretrain} is not the toy world, but these settings keep the toy world's values "
            f"(tuned for 300k-parameter models): {', '.join(left)}. Set them for your models "
            "(configs/qwen3_32b_to_8b.yaml has real-model values)."]


def _agentic_toy_dir():
    import toy_agentic  # not at the top: it imports the rollout stack

    return toy_agentic.TOY_DIR


def check_lengths(cfg):
    from transformers import AutoConfig

    n_pos = AutoConfig.from_pretrained(cfg.pretrain).max_position_embeddings
    if cfg.prompt_length + cfg.response_length > n_pos:
        raise ConfigError(f"prompt_length + response_length = {cfg.prompt_length + cfg.response_length} "
                          f"exceeds the student's max_position_embeddings ({n_pos})")
    if cfg.pure_opd_pipeline_type == "agentic":  # a first observation plus one turn must fit
        import agent
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.pretrain)
        template_of = lambda tag: cfg.tag_to_template.get(tag, cfg.global_template)
        val_tags = cfg.val_env_manager.tags or sorted(cfg.custom_envs)
        # the validation episodes are known now; training seeds are checked as they are drawn
        pairs = [(tag, seed) for tag in cfg.custom_envs for seed in range(8)]
        pairs += agent.val_seeds(val_tags, cfg.val_env_manager.num_env_groups) if cfg.validation.eval_steps else []
        try:
            agent.check_first_observations(cfg.custom_envs, pairs, tokenizer, template_of, cfg.prompt_length)
        except agent.EnvError as e:
            raise ConfigError(str(e)) from None
