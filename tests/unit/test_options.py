"""Options declared once: every option of every command round-trips through TOML, the
environment and the command line, has help text, and unknown names are refused."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from n2s_stream.cli import COMMANDS, TABLES, command_parser, make_parser
from n2s_stream.config import DaemonConfig, TrainConfig
from n2s_stream.errors import UsageError
from n2s_stream.options import (
    Option,
    as_toml,
    build,
    cli_layer,
    env_layer,
    env_prefix,
    options_of,
    read_toml_table,
    unknown_env,
    values,
)

CLASSES = list(TABLES.items())


def _other_value(opt: Option) -> Any:
    """A valid value different from the option's default."""
    if opt.choices:
        return next(c for c in opt.choices if c != opt.default)
    if opt.is_bool:
        return not opt.default
    if opt.is_list:
        if "sink" in opt.name:
            return ("a.module:factory",)
        if "path_map" in opt.name:
            return ("/det/a=/mnt/a", "/det/b=/mnt/b")
        return (Path("/x/a.h5"), Path("/x/b.h5"))
    kind = type(opt.default) if opt.default is not None else None
    text = str(opt.hint)
    if opt.name == "tile":
        return 256  # must exceed twice tile_overlap
    if kind is int or (kind is None and "int" in text):
        value = (opt.default or 0) + (2 if opt.name == "context_frames" else 1)
        return value if opt.maximum is None or value <= opt.maximum else value - 2
    if kind is float or (kind is None and "float" in text):
        value = (opt.default or 0.0) + 1.5
        return value if opt.maximum is None or value <= opt.maximum else opt.maximum / 2
    if "Path" in text:
        return Path("/tmp/elsewhere")
    if opt.name == "shape":
        return "64x32"
    return "tcp://127.0.0.1:5555" if "zmq" in opt.name or "bind" in opt.name else "other"


def _companions(opt: Option, cls: type) -> list[tuple[str, dict[str, Any]]]:
    """A base layer of the other options that ``opt``'s other value needs: a mask
    channel and J-invariant inference only fit noise2self, which the daemon does not
    train by default."""
    names = {o.name for o in options_of(cls)}
    if opt.name in ("mask_as_input", "jinv") and "objective" in names:
        return [("companions", {"objective": "noise2self"})]
    return []


def _text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return f'"{value}"'


def _value_at(config: object, opt: Option) -> Any:
    for part in opt.path:
        config = getattr(config, part)
    return config


@pytest.mark.parametrize("command, cls", CLASSES, ids=[c or "daemon" for c, _ in CLASSES])
def test_every_option_round_trips_through_toml_env_and_cli(command, cls, tmp_path):
    table = command or "daemon"
    parser = command_parser(command) if command else make_parser()
    for opt in options_of(cls):
        assert len(opt.help) > 8, f"{opt.name}: no help text"
        wanted = _other_value(opt)
        base = _companions(opt, cls)
        # TOML
        path = tmp_path / "c.toml"
        path.write_text(f"[{table}]\n{opt.name} = {_toml(wanted)}\n")
        from_file = build(cls, [*base, (str(path), read_toml_table(path, table))])
        assert _value_at(from_file, opt) == wanted, opt.name
        # environment
        environ = {env_prefix(command) + opt.name.upper(): _text(wanted)}
        from_env = build(cls, [*base, ("environment", env_layer(cls, command, environ))])
        assert _value_at(from_env, opt) == wanted, opt.name
        # command line
        if opt.positional:
            argv = [str(v) for v in wanted]
        elif opt.is_bool:
            argv = [opt.flag if wanted else "--no-" + opt.name.replace("_", "-")]
        elif opt.is_list:
            argv = [arg for v in wanted for arg in (opt.flag, str(v))]
        else:
            argv = [opt.flag, str(wanted)]
        args = parser.parse_args(argv)
        from_cli = build(cls, [*base, ("command line", cli_layer(args, cls))])
        assert _value_at(from_cli, opt) == wanted, opt.name
        # and the effective config written to outputs reads back the same
        printed = tmp_path / "printed.toml"
        printed.write_text(as_toml(from_file, table))
        assert build(cls, [("printed", read_toml_table(printed, table))]) == from_file


def test_help_lists_every_option_once_without_double_negatives():
    for command, cls in CLASSES:
        parser = command_parser(command) if command else make_parser()
        help_text = parser.format_help()
        assert "--no-no-" not in help_text
        for opt in options_of(cls):
            if not opt.positional:
                assert opt.flag in help_text, (command, opt.flag)
    assert "--no-scale-integers" in command_parser("train").format_help()


def test_flat_names_are_unique_and_the_toml_keys_of_earlier_versions():
    names = [o.name for o in options_of(DaemonConfig)]
    assert len(names) == len(set(names))
    for kept in (
        "watch",
        "zmq",
        "zmq_protocol",
        "zmq_tee",
        "shared_feed",
        "state_dir",
        "metrics_port",
        "no_scale_integers",
        "queue_size",
        "drop_when_full",
        "ckpt",
    ):
        assert kept in names


def test_bounds_and_choices_are_refused_with_source_and_name():
    with pytest.raises(UsageError, match=r"file\.toml: option 'queue_size': 0 is below"):
        build(DaemonConfig, [("file.toml", {"queue_size": 0})])
    with pytest.raises(UsageError, match=r"option 'engine': 'tensorrt' is not one of"):
        build(DaemonConfig, [("environment", {"engine": "tensorrt"})])
    with pytest.raises(UsageError, match=r"unknown option 'metrics_prot'"):
        build(DaemonConfig, [("x.toml", {"metrics_prot": 1})])
    for command in (DaemonConfig, TrainConfig):  # a mask channel with nothing hidden
        with pytest.raises(UsageError, match="neighbor2neighbor hides no pixels"):
            build(command, [("cli", {"objective": "neighbor2neighbor", "mask_as_input": True})])
    with pytest.raises(UsageError, match=r"binomial hides no pixels.*objective = noise2self"):
        build(DaemonConfig, [("cli", {"mask_as_input": True})])  # the daemon's default
    with pytest.raises(UsageError, match=r"binomial trains without a blind spot: jinv"):
        build(DaemonConfig, [("cli", {"jinv": True})])
    assert build(DaemonConfig, [("cli", {"jinv": True, "objective": "noise2self"})]).inference.jinv
    config = build(
        DaemonConfig, [("a", {"zmq": "tcp://h:1", "queue_size": 8}), ("b", {"queue_size": 9})]
    )  # later layers win
    assert config.zmq.endpoint == "tcp://h:1" and config.inference.queue_size == 9
    assert dict(values(config))  # every option has a value


def test_unknown_environment_variable_is_refused():
    assert unknown_env(
        TABLES, {"N2S_WATCH": "/a", "N2S_TRAIN_EPOCHS": "3", "N2S_WATHC": "/a", "OTHER": "1"}
    ) == ["N2S_WATHC"]
    env = {**os.environ, "N2S_METRICS_PROT": "9000"}
    proc = subprocess.run(
        [sys.executable, "-m", "n2s_stream", "check-config", "--template"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "n2s-stream check-config: error: environment: unknown variable N2S_METRICS_PROT (no "
        "such option; N2S_<OPTION> for the daemon, N2S_<COMMAND>_<OPTION> for a command)"
    ]


def test_a_subcommand_error_prints_that_subcommands_usage():
    proc = subprocess.run(
        [sys.executable, "-m", "n2s_stream", "denoise", "--colour", "red"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: n2s-stream denoise")
    assert "--watch" not in proc.stderr  # not the daemon's whole usage
    assert set(COMMANDS) <= set(make_parser().format_help().replace(":", " ").split())


def test_namespace_without_options_gives_defaults():
    args = argparse.Namespace(config=None, log_level="INFO")
    assert build(DaemonConfig, [("cli", cli_layer(args, DaemonConfig))]) == DaemonConfig()
