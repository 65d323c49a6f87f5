"""`hiervl`: one command-line entry point with a subcommand per stage of the pipeline.

Each subcommand lives in its own module in `launch/` (`launch/prep.py`, `launch/train.py`, ...)
exposing `HELP` (one line), `DESCRIPTION` (with an example), `add_arguments(parser)` and
`main(args, cfg) -> int`. A subcommand is listed only when its module exists: nothing here
pretends. Every subcommand takes `--config FILE`, dotted overrides and `--print-config`.

Owns: argument parsing, config loading with overrides and the exit codes of every subcommand.
Must not touch: any subcommand's work.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hiervl.config import ConfigError, load_config, to_yaml
from hiervl.errors import UserError

SUBCOMMANDS = ("synth", "prep", "train", "eval", "search", "export", "submit", "demo")
_MODULES = {"eval": "hiervl.launch.evaluate"}  # `eval` is a builtin name; its module is evaluate.py


def _module_name(name: str) -> str:
    return _MODULES.get(name, f"hiervl.launch.{name}")


def available_subcommands() -> dict:
    """Subcommand name -> module, for the modules that exist."""
    found = {}
    for name in SUBCOMMANDS:
        mod_name = _module_name(name)
        try:
            found[name] = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name != mod_name:  # a real missing dependency inside the module: a bug, show it
                raise
    return found


def build_parser(commands: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hiervl",
        description="hiervl: hierarchical video-text retrieval pretraining, from raw videos to a "
        "searchable model. Every subcommand takes --config FILE plus dotted overrides "
        "(train.lr=3e-4 model.preset=hcmi) and --print-config.",
        epilog="Example: hiervl train --config configs/tiny.yaml train.steps=100",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in commands.items():
        p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", metavar="FILE", help="YAML config (e.g. configs/tiny.yaml); defaults apply without one")
        p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
        module.add_arguments(p)
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted config overrides, e.g. train.lr=3e-4 model.preset=hcmi")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; everything it prints passes pipeline/redact.py (no credential of a URL is shown)."""
    from hiervl.redact import RedactingStream

    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(out), RedactingStream(err)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = out, err


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:  # a typo: one line, a suggestion
        import difflib

        close = difflib.get_close_matches(argv[0], SUBCOMMANDS, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        print(f"hiervl: '{argv[0]}' is not a command; {hint}commands: {', '.join(SUBCOMMANDS)} (hiervl --help)",
              file=sys.stderr)
        return 2
    commands = available_subcommands()
    if argv and argv[0] in SUBCOMMANDS and argv[0] not in commands:
        print(f"hiervl: '{argv[0]}' is not built yet; available: {', '.join(commands) or 'none'}", file=sys.stderr)
        return 2
    parser = build_parser(commands)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # Overrides may come after options; argparse leaves KEY=VALUE items it could not place.
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown:
        parser.parse_args(argv)  # let argparse report the unknown option (exit 2)
    args.overrides = list(args.overrides) + [a for a in extra if a not in unknown]
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"hiervl {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:  # what the subcommand would run with (the demo: configs/demo.yaml under its --out)
        resolve = getattr(commands[args.command], "resolved_config", None)
        try:
            print(to_yaml(resolve(args) if resolve else cfg), end="")
        except ConfigError as exc:
            print(f"hiervl {args.command}: config error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        return int(commands[args.command].main(args, cfg) or 0)
    except ConfigError as exc:
        print(f"hiervl {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"hiervl {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hiervl {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:  # console script
    sys.exit(main())


if __name__ == "__main__":
    entry()
