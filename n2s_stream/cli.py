"""Command line: parse arguments, layer them over config file and environment, run.

Every command's flags are generated from its config class (``config.py``), so a flag, a
TOML key and an ``N2S_*`` variable never disagree. Exit status: 0 success, 2 usage or
config error, 1 runtime failure; every deliberate error is one line naming what and why.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from n2s_stream import __version__
from n2s_stream.config import (
    DaemonConfig,
    DemoConfig,
    DenoiseConfig,
    MergeConfig,
    SimulateConfig,
    TrainConfig,
)
from n2s_stream.errors import N2SError, UsageError
from n2s_stream.options import (
    add_arguments,
    as_toml,
    build,
    cli_layer,
    layered,
    read_toml,
    template,
    unknown_env,
)
from n2s_stream.runtime.allocator import keep_freed_memory
from n2s_stream.runtime.worker import unfinished_threads

log = logging.getLogger("n2s_stream")

EXIT_GRACE_SECONDS = 30.0
"""How long a stopped daemon waits for its thread pools' workers before it exits anyway."""

COMMANDS: dict[str, tuple[type, str]] = {
    "train": (TrainConfig, "train a denoiser on a noisy HDF5 stack (self-supervised)"),
    "denoise": (DenoiseConfig, "denoise an HDF5 stack with a trained checkpoint"),
    "simulate": (
        SimulateConfig,
        "test detector: write noisy frames (truth kept aside) or send them over ZeroMQ",
    ),
    "demo": (DemoConfig, "simulate a detector and watch denoising quality improve"),
    "merge": (MergeConfig, "join the shards of a fanned-out series (virtual dataset)"),
}
"""Each command's config class (its TOML table is ``[<command>]``) and summary."""

TABLES: dict[str | None, type] = {
    None: DaemonConfig,
    **{name: cls for name, (cls, _) in COMMANDS.items()},
}
"""Config class by command (None: the daemon), for the environment check."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _common(parser: argparse.ArgumentParser, *, log_level: str) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML file; its table for this command ([daemon], [train], ...) is read",
    )
    parser.add_argument(
        "--log-level",
        default=log_level,
        type=str.upper,
        choices=LOG_LEVELS,
        help=f"(default {log_level})",
    )


def command_parser(command: str, prog: str = "n2s-stream") -> argparse.ArgumentParser:
    """The parser of one command: its own usage on its own errors."""
    cls, summary = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"{prog} {command}", description=summary)
    _common(parser, log_level="WARNING" if command == "demo" else "INFO")
    add_arguments(parser, cls)
    return parser


def _check_config_parser(prog: str = "n2s-stream") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{prog} check-config",
        description="validate a config file and print it resolved, or print the commented template",
    )
    parser.add_argument("file", type=Path, nargs="?")
    parser.add_argument(
        "--template",
        action="store_true",
        help="print every option of every command at its default, commented "
        "(what config/n2s-stream.toml holds)",
    )
    parser.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS)
    return parser


def make_parser() -> argparse.ArgumentParser:
    """The daemon's parser, which also lists the commands."""
    parser = argparse.ArgumentParser(
        prog="n2s-stream",
        description="Self-supervised denoising of detector frames (binomial splitting of "
        "photon counts, Neighbor2Neighbor, Noise2Self). Without a "
        "command, runs the streaming daemon. Commands: "
        + "; ".join(f"{name}: {summary}" for name, (_, summary) in COMMANDS.items())
        + "; check-config: validate a config file. `n2s-stream COMMAND --help` "
        "lists a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"n2s-stream {__version__}")
    group = parser.add_argument_group("daemon (n2s-stream --watch DIR | --zmq ENDPOINT ...)")
    _common(group, log_level="INFO")  # type: ignore[arg-type]
    add_arguments(group, DaemonConfig)
    return parser


TEMPLATE_HEADER = """\
# n2s-stream configuration: every option of every command at its default, with its help.
# Made by `n2s-stream check-config --template`, from the options' declarations.
# Each option can also be given on the command line (--option-name) or in the environment:
# N2S_<OPTION> for the daemon (N2S_WATCH=/acq), N2S_<COMMAND>_<OPTION> for a command
# (N2S_TRAIN_EPOCHS=5). Precedence: command line > environment > this file > defaults.
# Unknown keys and unknown N2S_ variables are refused with their name.
"""


def config_template() -> str:
    """The commented default config file: a table per command."""
    tables = [("daemon", DaemonConfig), *((name, cls) for name, (cls, _) in COMMANDS.items())]
    return TEMPLATE_HEADER + "".join("\n" + template(cls, table) for table, cls in tables)


def _check_config(path: Path) -> None:
    """Every table of the file must build; prints the resolved options."""
    document = read_toml(path)
    known = {"daemon": DaemonConfig, **{name: cls for name, (cls, _) in COMMANDS.items()}}
    unknown = set(document) - set(known)
    if unknown:
        raise UsageError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}")
    for table, cls in known.items():
        body = document.get(table, {})
        if not isinstance(body, dict):
            raise UsageError(f"{path}: [{table}] must be a table")
        print(as_toml(build(cls, [(str(path), body)]), table))
    print(f"{path}: OK")


def _run_daemon(args: argparse.Namespace) -> int:
    from n2s_stream.daemon import Daemon

    config = layered(
        DaemonConfig,
        None,
        config_file=args.config,
        cli=cli_layer(args, DaemonConfig),
        table="daemon",
    )
    status = Daemon(config).run()
    left = unfinished_threads(EXIT_GRACE_SECONDS)
    if left:
        log.error(
            "threads %s still running %.0f s after the stop; their stacks follow, exiting anyway",
            left,
            EXIT_GRACE_SECONDS,
        )
        faulthandler.dump_traceback(all_threads=True)
        logging.shutdown()
        os._exit(status or 1)
    return status


def _train(config: TrainConfig) -> None:
    from n2s_stream.commands.offline import train

    result = train(config)
    print(f"checkpoints: {result.last}" + (f", {result.best}" if result.best else ""))


def _denoise(config: DenoiseConfig) -> None:
    from n2s_stream.commands.offline import denoise

    result = denoise(config)
    print(f"wrote {result.n_frames} frames to {result.out}")


def _simulate(config: SimulateConfig) -> None:
    from n2s_stream.commands.simulate import simulate, simulate_pva, simulate_zmq

    if config.pva_serve:
        print(f"served {simulate_pva(config)} frames on {config.pva_serve}")
    elif config.zmq_bind:
        print(f"sent {simulate_zmq(config)} frames to {config.zmq_bind}")
    else:
        path = simulate(config)
        print(f"wrote {config.frames} frames to {path}")


def _demo(config: DemoConfig) -> None:
    from n2s_stream.commands.demo import run_demo

    run_demo(
        config.dir,
        seconds=config.seconds,
        context_frames=config.context_frames,
        source=config.source,
    )


def _merge(config: MergeConfig) -> None:
    from n2s_stream.formats.vds import merge_shards

    if config.out is None:
        raise UsageError("merge: --out FILE is required")
    result = merge_shards(list(config.shards), config.out)
    print(
        f"{result.out}: {result.n_frames} frames from {len(config.shards)} shards"
        + (f", missing {result.missing}" if result.missing else "")
    )


RUNNERS: dict[str, Callable[[Any], None]] = {
    "train": _train,
    "denoise": _denoise,
    "simulate": _simulate,
    "demo": _demo,
    "merge": _merge,
}


def _parse(argv: list[str]) -> tuple[str | None, argparse.Namespace]:
    """The command (None: the daemon) and its arguments, parsed by its own parser."""
    if argv and argv[0] in COMMANDS:
        return argv[0], command_parser(argv[0]).parse_args(argv[1:])
    if argv and argv[0] == "check-config":
        return "check-config", _check_config_parser().parse_args(argv[1:])
    return None, make_parser().parse_args(argv)


def _run(command: str | None, args: argparse.Namespace) -> int:
    unknown = unknown_env(TABLES)
    if unknown:
        raise UsageError(
            f"environment: unknown variable {unknown[0]} (no such option; "
            "N2S_<OPTION> for the daemon, N2S_<COMMAND>_<OPTION> for a command)"
        )
    if command in ("train", "denoise"):
        keep_freed_memory()  # frame-sized arrays come and go (the daemon's own run does too)
    if command is None:
        return _run_daemon(args)
    if command == "check-config":
        if args.template:
            print(config_template(), end="")
        elif args.file is None:
            raise UsageError("check-config: give a FILE, or --template")
        else:
            _check_config(args.file)
        return 0
    cls, _ = COMMANDS[command]
    config: object = layered(cls, command, config_file=args.config, cli=cli_layer(args, cls))
    RUNNERS[command](config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``n2s-stream``; returns the exit status."""
    command, args = _parse(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    name = f"n2s-stream {command}" if command else "n2s-stream"
    try:
        return _run(command, args)
    except UsageError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except N2SError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
