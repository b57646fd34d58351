"""Options declared once, on dataclass fields; command line, TOML, environment and
``check-config`` are generated from them.

A config class is a frozen dataclass whose fields are made with `option` (type from the
annotation, ``Literal[...]`` for choices, help text and bounds in the metadata) or with
`section` (a nested dataclass of one stage's options). Every option has one flat name,
used alike as the TOML key (``zmq_protocol``), the flag (``--zmq-protocol``) and the
environment variable (``N2S_ZMQ_PROTOCOL``, or ``N2S_TRAIN_EPOCHS`` for a command).
Values are layered: defaults < file < environment < command line; unknown keys and
values out of bounds or choices are refused with their source and name.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from n2s_stream.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")  # a config class: a dataclass of option()s


def option(
    default: Any = MISSING,
    *,
    help: str,
    name: str | None = None,
    min: float | None = None,
    max: float | None = None,
    positional: bool = False,
    example: Any = None,
) -> Any:
    """A config field: its default, help text, optional bounds, a flat name when the
    field's own name (with its section's prefix) is not what users type, and an example
    value for the config template when it has no default."""
    metadata = {
        "help": help,
        "name": name,
        "min": min,
        "max": max,
        "positional": positional,
        "example": example,
    }
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, *, prefix: str = "") -> Any:
    """A nested dataclass of one stage's options; its options' flat names get ``prefix``."""
    return field(default_factory=cls, metadata={"section": True, "prefix": prefix})


@dataclass(frozen=True)
class Option:
    """One user-facing option: flat ``name``, where it lives (``path`` of attributes),
    its type and what the user is told about it."""

    name: str
    path: tuple[str, ...]
    hint: Any
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    positional: bool = False
    example: Any = None
    section: str = ""  # the first line of its section's docstring

    @property
    def flag(self) -> str:
        """The command-line flag."""
        return "--" + self.name.replace("_", "-")

    @property
    def choices(self) -> tuple[Any, ...] | None:
        """The allowed values of a ``Literal`` option."""
        base = _strip_optional(self.hint)
        return get_args(base) if get_origin(base) is Literal else None

    @property
    def is_bool(self) -> bool:
        """True for a switch."""
        return _strip_optional(self.hint) is bool

    @property
    def is_list(self) -> bool:
        """True for a ``tuple[X, ...]`` option (a TOML array, repeated or comma-separated)."""
        return get_origin(_strip_optional(self.hint)) is tuple


def options_of(
    cls: type, *, prefix: str = "", path: tuple[str, ...] = (), section_doc: str = ""
) -> list[Option]:
    """Every option of ``cls``, sections flattened, in declaration order."""
    hints = get_type_hints(cls)
    found: list[Option] = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("section"):
            inner = hints[f.name]
            found += options_of(
                inner,
                prefix=prefix + f.metadata.get("prefix", ""),
                path=(*path, f.name),
                section_doc=(inner.__doc__ or "").strip().split("\n")[0],
            )
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with option()")
        default = (
            f.default
            if f.default is not MISSING
            else (f.default_factory() if f.default_factory is not MISSING else None)
        )
        found.append(
            Option(
                name=f.metadata["name"] or prefix + f.name,
                path=(*path, f.name),
                hint=hints[f.name],
                default=default,
                help=f.metadata["help"],
                minimum=f.metadata["min"],
                maximum=f.metadata["max"],
                positional=f.metadata["positional"],
                example=f.metadata["example"],
                section=section_doc,
            )
        )
    return found


def build(cls: type[T], layers: list[tuple[str, Mapping[str, Any]]]) -> T:
    """Build ``cls`` from flat mappings applied in order (later wins), each named for
    errors. Raises `UsageError` naming the source and key of an unknown option or a bad
    value."""
    by_name = {o.name: o for o in options_of(cls)}
    values: dict[tuple[str, ...], Any] = {}
    for source, mapping in layers:
        for key, raw in mapping.items():
            opt = by_name.get(key.replace("-", "_"))
            if opt is None:
                raise UsageError(f"{source}: unknown option {key!r}")
            values[opt.path] = coerce(raw, opt, f"{source}: option {key!r}")
    return _construct(cls, values, ())


def make(cls: type[T], **flat: Any) -> T:
    """Build ``cls`` from options given by their flat names (as in a TOML table), for
    code that configures a command: ``make(TrainConfig, h5=path, context_frames=3)``."""
    return build(cls, [("arguments", flat)])


def _construct(cls: type[T], values: dict[tuple[str, ...], Any], path: tuple[str, ...]) -> T:
    hints = get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        here = (*path, f.name)
        if f.metadata.get("section"):
            kwargs[f.name] = _construct(hints[f.name], values, here)
        elif here in values:
            kwargs[f.name] = values[here]
    return cls(**kwargs)


def coerce(value: Any, opt: Option, where: str) -> Any:
    """``value`` (from TOML, environment or command line) as the option's type, checked
    against its choices and bounds."""
    base = _strip_optional(opt.hint)
    if value is None:
        if base is not opt.hint:
            return None
        raise UsageError(f"{where}: a value is required")
    try:
        if get_origin(base) is tuple:
            item = get_args(base)[0]
            items = value.split(",") if isinstance(value, str) else list(value)
            result: Any = tuple(
                _scalar(v.strip() if isinstance(v, str) else v, item) for v in items if v != ""
            )
        else:
            result = _scalar(value, base)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: invalid value {value!r} (expected {_describe(base)})") from exc
    choices = opt.choices
    if choices is not None and result not in choices:
        raise UsageError(f"{where}: {result!r} is not one of {', '.join(map(str, choices))}")
    if opt.minimum is not None and result < opt.minimum:
        raise UsageError(f"{where}: {result!r} is below its minimum {opt.minimum:g}")
    if opt.maximum is not None and result > opt.maximum:
        raise UsageError(f"{where}: {result!r} is above its maximum {opt.maximum:g}")
    return result


def _scalar(value: Any, kind: Any) -> Any:
    if get_origin(kind) is Literal:
        kind = type(get_args(kind)[0])
    if kind is bool:
        return _to_bool(value)
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if kind is Path:
        if not isinstance(value, (str, Path)):
            raise ValueError(value)
        return Path(value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    raise TypeError(f"unsupported option type {kind!r}")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _strip_optional(hint: Any) -> Any:
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _describe(kind: Any) -> str:
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(map(str, get_args(kind)))
    if get_origin(kind) is tuple:
        return f"a list of {_describe(get_args(kind)[0])}"
    return getattr(kind, "__name__", str(kind))


# ---- command line --------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser | Any, cls: type) -> None:
    """One argument per option of ``cls``; absent arguments stay absent (SUPPRESS), so
    they do not hide lower layers."""
    for opt in options_of(cls):
        help_text = _help(opt)
        if opt.positional:
            parser.add_argument(
                opt.name,
                nargs="*" if opt.is_list else None,
                type=str,
                help=help_text,
                default=argparse.SUPPRESS,
            )
        elif opt.is_bool and opt.name.startswith("no_"):
            # a negative switch (--no-scale-integers): no --no-no-... twin
            parser.add_argument(
                opt.flag,
                dest=opt.name,
                action="store_const",
                const=True,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif opt.is_bool:
            parser.add_argument(
                opt.flag,
                dest=opt.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif opt.is_list:
            parser.add_argument(
                opt.flag,
                dest=opt.name,
                action="append",
                type=str,
                default=argparse.SUPPRESS,
                metavar="VALUE",
                help=help_text + " (repeat the flag for more)",
            )
        else:
            parser.add_argument(
                opt.flag,
                dest=opt.name,
                type=str,
                default=argparse.SUPPRESS,
                metavar=_metavar(opt),
                help=help_text,
            )


def _help(opt: Option) -> str:
    if opt.default is None or (opt.is_bool and opt.name.startswith("no_")):
        return opt.help
    default = ",".join(map(str, opt.default)) if opt.is_list else opt.default
    return f"{opt.help} (default {default if default != '' else 'none'})".replace("%", "%%")


def _metavar(opt: Option) -> str:
    choices = opt.choices
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    return {int: "N", float: "X", Path: "PATH"}.get(_strip_optional(opt.hint), "TEXT")


def cli_layer(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of ``cls`` given on the command line."""
    names = {o.name for o in options_of(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


# ---- environment and files -----------------------------------------------------------------
def env_prefix(command: str | None) -> str:
    """``N2S_`` for the daemon, ``N2S_<COMMAND>_`` for a command."""
    return "N2S_" if command is None else f"N2S_{command.upper().replace('-', '_')}_"


def env_layer(
    cls: type, command: str | None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The options of ``cls`` given as environment variables."""
    environ = os.environ if environ is None else environ
    prefix = env_prefix(command)
    names = {o.name for o in options_of(cls)}
    return {
        key[len(prefix) :].lower(): value
        for key, value in environ.items()
        if key.startswith(prefix) and key[len(prefix) :].lower() in names
    }


def unknown_env(
    commands: Mapping[str | None, type], environ: Mapping[str, str] | None = None
) -> list[str]:
    """``N2S_*`` variables that name no option of any command (a typo would otherwise
    be ignored without a word, as an unknown TOML key is not)."""
    environ = os.environ if environ is None else environ
    known = {
        env_prefix(command) + o.name.upper()
        for command, cls in commands.items()
        for o in options_of(cls)
    }
    return sorted(key for key in environ if key.startswith("N2S_") and key not in known)


def read_toml_table(path: Path, table: str) -> dict[str, Any]:
    """The ``[table]`` of a TOML file (empty if absent); errors name the file."""
    document = read_toml(path)
    body = document.get(table, {})
    if not isinstance(body, dict):
        raise UsageError(f"{path}: [{table}] must be a table")
    return body


def read_toml(path: Path) -> dict[str, Any]:
    """A whole TOML file; errors name the file."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: config file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: invalid TOML: {exc}") from exc
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def layered(
    cls: type[T],
    command: str | None,
    *,
    config_file: Path | None,
    cli: Mapping[str, Any],
    table: str | None = None,
) -> T:
    """Defaults < ``[table]`` of the config file < environment < command line."""
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if config_file is not None:
        layers.append(
            (str(config_file), read_toml_table(config_file, table or command or "daemon"))
        )
    layers.append(("environment", env_layer(cls, command)))
    layers.append(("command line", cli))
    return build(cls, layers)


def values(config: object) -> Iterator[tuple[Option, Any]]:
    """Each option of a config object with its value."""
    for opt in options_of(type(config)):
        value = config
        for part in opt.path:
            value = getattr(value, part)
        yield opt, value


def as_toml(config: object, table: str) -> str:
    """The effective options as a flat TOML table, for output files, logs and
    ``check-config``; an unset optional value is left out."""
    lines = [f"[{table}]"]
    for opt, value in values(config):
        if value is None:
            continue
        lines.append(f"{opt.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def template(cls: type, table: str) -> str:
    """A commented ``[table]`` listing every option of ``cls`` at its default (options
    without a default commented out, with an example), each with its help text: the
    shipped ``config/n2s-stream.toml`` is made of these."""
    lines = [f"[{table}]"]
    section = None
    for opt in options_of(cls):
        if opt.section != section and opt.section:
            lines.append(f"# -- {opt.section}")
        section = opt.section
        if opt.positional:
            continue
        if opt.default is None:
            example = opt.example if opt.example is not None else "..."
            setting = f"# {opt.name} = {_toml_value(example)}"
        else:
            setting = f"{opt.name} = {_toml_value(opt.default)}"
        help_lines = textwrap.wrap(opt.help, 100 - 34) or [""]
        lines.append(f"{setting:<32}  # {help_lines[0]}")
        lines += [f"{'':<32}  # {more}" for more in help_lines[1:]]
    return "\n".join(lines) + "\n"
