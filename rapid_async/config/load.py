"""Loading a run configuration: TOML files, `--set a.b=c` overrides, writing TOML back.

Used by every process through `rapid_async.config`: `load_config(path,
overrides)` reads the file, applies the overrides with each value checked or
converted to its field's type, and validates; `dumps_toml` writes a config that
`load_config` reads back (the learner saves RUN_DIR/config.toml).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path
from typing import Any, get_type_hints

from rapid_async.config.sections import Config


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under each dataclass field (for --help and docs)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())  # type: ignore[union-attr]
    return docs


def _literal(text: str) -> Any:
    """A --set value as TOML reads it (3 -> int, true -> bool, [..] -> list),
    else the text itself as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(dotted: str, value: Any, typ: Any) -> Any:
    """Check or convert a TOML / --set value to the field's declared type."""
    origin = getattr(typ, "__origin__", None)
    if origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ValueError(f"{dotted} = {value!r}: expected a table")
    if origin is list:
        if isinstance(value, str):
            value = _literal(value) if value.strip().startswith("[") else [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError(f"{dotted} = {value!r}: expected a list of strings, e.g. [\"a\", \"b\"]")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    raise ValueError(f"{dotted} = {value!r}: expected a value of type {typ.__name__}")


def _task_option(cfg: Config, key: str, value: Any, from_set: bool) -> None:
    """Store one task option: `options.KEY` (--set) or a key under [task] that is
    not a TaskConfig field (the older flat form, e.g. `digits = 2`)."""
    name = key.split(".", 1)[1] if key.startswith("options.") else key
    cfg.task.options[name] = _literal(value) if from_set and isinstance(value, str) else value


def apply_dict(cfg: Config, data: dict[str, Any], source: str = "config") -> Config:
    """Set fields of `cfg` from a nested dict {section: {key: value}}.

    Under [task], `options` is a free table and keys that are not TaskConfig
    fields become task options (the task validates them when it is built).
    """
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for section, values in data.items():
        if section not in sections:
            raise ValueError(f"{source}: unknown section [{section}]; known: "
                             f"{', '.join(sections)}")
        if not isinstance(values, dict):
            raise ValueError(f"{source}: [{section}] must be a table")
        obj = getattr(cfg, section)
        hints = get_type_hints(type(obj))
        for key, value in values.items():
            if section == "task" and (key.startswith("options.") or key not in hints):
                _task_option(cfg, key, value, from_set=source == "--set")
                continue
            if section == "env" and key.startswith("options."):
                name = key.split(".", 1)[1]
                cfg.env.options[name] = (_literal(value) if source == "--set"
                                         and isinstance(value, str) else value)
                continue
            if key not in hints:
                raise ValueError(f"{source}: unknown field {section}.{key}; known: "
                                 f"{', '.join(hints)}")
            if section in ("task", "env") and key == "options":
                getattr(cfg, section).options.update(
                    _coerce(f"{source}: {section}.options", value, hints[key]))
                continue
            setattr(obj, key, _coerce(f"{source}: {section}.{key}", value, hints[key]))
    return cfg


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ["learner.lr=3e-4", ...] into {"learner": {"lr": "3e-4"}}.

    `task.options.KEY=VALUE` sets one task option (kept as "options.KEY").
    """
    data: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--set {item!r}: expected section.key=value, "
                             "e.g. --set learner.lr=3e-4")
        dotted, value = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        data.setdefault(section, {})[key] = value.strip()
    return data


def resolve_device(name: str) -> str:
    """A config device name as torch understands it: "auto" is "cuda" when this
    process sees a GPU (the one the launcher gave it via CUDA_VISIBLE_DEVICES),
    else "cpu"; other names are returned unchanged."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML run config, apply `--set` overrides and validate.

    Raises:
        ValueError: naming the file, field and fix when anything is wrong.
    """
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {p} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{p}: not valid TOML: {e}") from None
        apply_dict(cfg, data, source=str(p))
    if overrides:
        apply_dict(cfg, parse_overrides(overrides), source="--set")
    return cfg.validate()


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a validated Config from `Config.to_dict()` output."""
    return apply_dict(Config(), data).validate()


def _toml_value(value: Any) -> str:
    """One value in TOML syntax (tables inline)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    return repr(value)


def dumps_toml(cfg: Config) -> str:
    """Write a config as TOML (one table per section; task options inline)."""
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)
