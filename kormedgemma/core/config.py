"""Load a named profile, apply YAML and papermill overrides, validate, resolve paths.

Validation happens while the dataclasses are rebuilt from plain data: every key is checked
against the dataclass fields (unknown keys list the known ones), every value against its type
hint, and each dataclass's `__post_init__` rejects impossible values. Errors carry the dotted
key (``tokenizer.min_frequency: must be ≥ 1 (got 0)``) so a headless run fails in one line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

from config.training_config import PROFILES, ConfigError, ProjectConfig

__all__ = ["ConfigError", "ProjectConfig", "load_config", "apply_overrides", "config_to_dict",
           "config_hash", "repo_root", "resolve_path", "resolve_input", "known_profiles"]


def repo_root() -> Path:
    """The checkout this package lives in (editable install), where artifacts go by default."""
    return Path(__file__).resolve().parents[2]


def known_profiles() -> list[str]:
    return sorted(PROFILES)


def load_config(profile: str = "tiny", overrides: Optional[Mapping[str, Any]] = None,
                config_file: Optional[str | Path] = None) -> ProjectConfig:
    """Profile defaults, then the YAML file, then `overrides` (dotted keys or nested mappings)."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; known profiles: {', '.join(known_profiles())}")
    config = PROFILES[profile]()
    if config_file:
        config = apply_overrides(config, _read_yaml(Path(config_file)))
    if overrides:
        config = apply_overrides(config, overrides)
    return config


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`--set key=value` items: each value is read as YAML, so numbers, booleans and null work."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value (e.g. tokenizer.min_frequency=3)")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return overrides


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml  # imported here: config loading must stay cheap for the CLI's --help

    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def apply_overrides(config: ProjectConfig, overrides: Mapping[str, Any]) -> ProjectConfig:
    """Return a new, validated config. Keys are dotted (``staged.stage1.max_steps``) or nested."""
    data = config_to_dict(config)
    for key, value in _flatten(overrides).items():
        _set_dotted(data, key, value)
    return from_dict(ProjectConfig, data)


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        # A mapping is descended into, except where it replaces a whole dict-valued field
        # (e.g. `data.sources.mine: {...}` adds a source): _set_dotted handles both.
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = data
    # Below a user-keyed mapping (data.sources.<name>) entries may be new: from_dict checks their keys.
    open_entry = False
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parts[:depth])}: is a value, cannot hold key {part!r}")
        open_entry = open_entry or _is_open_mapping(data, parts[:depth])
        if part not in node:
            if open_entry:
                node[part] = {}
            else:
                raise ConfigError(f"unknown key {'.'.join(parts[:depth + 1])!r}; known here: "
                                  f"{', '.join(sorted(node))}")
        node = node[part]
        if node is None:  # an optional block switched on by override (e.g. stage lora)
            raise ConfigError(f"{'.'.join(parts[:depth + 1])} is null; set the whole block instead")
    if not isinstance(node, dict):
        raise ConfigError(f"{'.'.join(parts[:-1])}: is a value, cannot hold key {parts[-1]!r}")
    if parts[-1] not in node and not open_entry and not _is_open_mapping(data, parts[:-1]):
        raise ConfigError(f"unknown key {key!r}; known here: {', '.join(sorted(node))}")
    node[parts[-1]] = value


def _is_open_mapping(data: dict[str, Any], parts: list[str]) -> bool:
    """True where the config field is a dict[str, X] whose keys are the user's (sources)."""
    hint: Any = ProjectConfig
    for part in parts:
        hint = _unwrap_optional(hint)
        if dataclasses.is_dataclass(hint):
            hints = typing.get_type_hints(hint)
            if part not in hints:
                return False
            hint = hints[part]
        elif typing.get_origin(hint) is dict:
            hint = typing.get_args(hint)[1]
        else:
            return False
    return typing.get_origin(_unwrap_optional(hint)) is dict


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from plain data, checking keys and types along the way."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown key {where + unknown[0]!r}; known here: {', '.join(names)}")
    kwargs = {name: _coerce(hints[name], data[name], f"{path}.{name}" if path else name)
              for name in names if name in data}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{path}.{exc}" if path else str(exc)) from None


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: must not be null")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{path}: must be one of {list(allowed)} (got {value!r})")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: must be a list (got {type(value).__name__})")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: must be a mapping (got {type(value).__name__})")
        _, item = typing.get_args(hint)
        return {str(k): _coerce(item, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if value is None:
        raise ConfigError(f"{path}: must not be null")
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `2e-5` (no dot) as a string; people write it so
            value = _number_text(value, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: must be a number (got {value!r})")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: must be an integer (got {value!r})")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: must be true or false (got {value!r})")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a string (got {value!r})")
        return value
    return value


def _number_text(text: str, path: str) -> float:
    """A float written as text (`2e-5`, `1E-4`, `3e+2`); anything else stays a type error."""
    try:
        number = float(text.strip().replace("_", ""))
    except ValueError:
        raise ConfigError(f"{path}: must be a number (got {text!r})") from None
    if not math.isfinite(number):
        raise ConfigError(f"{path}: must be a finite number (got {text!r})")
    return number


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_hash(section: Any) -> str:
    """Stable hash of a config (or a section of it): decides whether a step must re-run."""
    data = config_to_dict(section) if dataclasses.is_dataclass(section) else section
    blob = json.dumps(data, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def resolve_path(config: ProjectConfig, relative: str | Path) -> Path:
    """A path from config: absolute stays, relative is taken from `paths.root` (repo root if empty)."""
    path = Path(relative).expanduser()
    if path.is_absolute():
        return path
    root = Path(config.paths.root).expanduser() if config.paths.root else repo_root()
    return (root if root.is_absolute() else repo_root() / root) / path


def resolve_input(config: ProjectConfig, relative: str | Path) -> Path:
    """A user-supplied input (bundled sample, local corpus): under `paths.root` if there, else
    under the repo root, so moving the artifact root does not hide the bundled samples."""
    path = resolve_path(config, relative)
    if path.exists():
        return path
    fallback = repo_root() / relative
    return fallback if not Path(relative).is_absolute() and fallback.exists() else path
