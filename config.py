"""Config loading: YAML presets with strict keys, then command-line flags (tyro).

`parse(Config, argv)`: `--config FILE.yaml` (if given) supplies the starting values, every
other flag overrides them (`--max_steps 5`, `--student_train.lr 1e-6`). A YAML key that
is not a field is an error that names the file and the dotted key and suggests the
closest field; a value of the wrong type names its key too. The schema itself (the
dataclasses and their docstrings, which are the --help) lives in opd.py.

Simplified: no config composition, no interpolation, no includes.
"""

import dataclasses
import difflib
import typing
from typing import Literal


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
    if origin is typing.Union:  # Optional[X]
        return None if val is None else _coerce(val, args[0], where)
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


def parse(config_cls, argv, description=None):
    """--config YAML (if any) gives the defaults; every other flag overrides them."""
    import tyro
    import yaml

    default = config_cls()
    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                with open(path) as f:
                    values = yaml.safe_load(f) or {}
            except OSError as e:
                raise ConfigError(f"--config: cannot read {path!r}: {e.strerror}") from None
            except yaml.YAMLError as e:
                raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
            default = from_dict(config_cls, values, path)
            default.config = path
    return tyro.cli(config_cls, args=argv, default=default, use_underscores=True,
                    description=description)
