"""``--config FILE``: a YAML file with the same settings as a command's flags (for systemd units).

Keys are the flags' names in snake_case (``--min-clients`` is ``min_clients``). The file is
validated at start-up like a firmware profile: a typed pydantic model built from the command's
own options (so it can never drift from the flags), unknown keys refused, every error naming the
file, the line and the field (CLI exit code 2). Precedence: a flag given on the command line,
then its environment variable, then the file, then the flag's default -- the file's values
become click's ``default_map``, which the eager ``--config`` option fills before any other
option is read.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from firmware.profile import ProfileError, read_yaml, yaml_line

#: Parameters a config file cannot set.
NOT_IN_FILE = frozenset({"config", "ctx"})


def config_model(command: Callable[..., Any]) -> type[BaseModel]:
    """The pydantic model of a command's config file: one optional field per flag, typed as the flag, nothing else."""
    hints = typing.get_type_hints(command, include_extras=False)
    fields: dict[str, Any] = {name: (hints[name], None) for name in inspect.signature(command).parameters
                              if name not in NOT_IN_FILE and name in hints}
    return create_model(f"{command.__name__}_config",
                        __config__=ConfigDict(extra="forbid"), **fields)


def load_config(path: Path, command: Callable[..., Any]) -> dict[str, Any]:
    """The settings ``path`` holds for ``command``, validated; ``typer.BadParameter`` names file, line and field."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise typer.BadParameter(f"{source}: cannot read: {exc.strerror}") from exc
    try:
        root, data = read_yaml(text, source)
    except ProfileError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{source}: a config file must be a mapping of settings, got {type(data).__name__}")
    model = config_model(command)
    try:
        validated = model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err.get("loc", ()))
            field = str(loc[0]) if loc else "<root>"
            line = yaml_line(root, loc[:1])
            msg = err.get("msg", "")
            if err.get("type") == "extra_forbidden":
                hint = field.replace("-", "_")
                msg = f"unknown setting (did you mean {hint}?)" if hint in model.model_fields else "unknown setting"
            lines.append(f"{source}:{line if line is not None else '?'}: {field}: {msg}")
        raise typer.BadParameter("\n".join(lines)) from exc
    return validated.model_dump(exclude_unset=True)


def apply_config(ctx: typer.Context, path: Path | None, command: Callable[..., Any]) -> Path | None:
    """The eager ``--config`` callback: the file's settings become defaults that flags override."""
    if path is not None and not ctx.resilient_parsing:
        ctx.default_map = {**(ctx.default_map or {}), **load_config(Path(path), command)}
    return path
