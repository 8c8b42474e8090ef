"""What every command-line tool of the project shares.

Global options (``--config PATH`` before the subcommand), ``--json`` output for
scripts, and one mapping of failures to exit codes: 0 success, 1 failed
operation, 2 bad usage or bad config. Tools are assembled from command modules
that each expose ``register(subparsers)``; subcommands set ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from stellarium_core.errors import StellarError, UsageError

#: A parent parser giving a subcommand the ``--json`` switch.
JSON = argparse.ArgumentParser(add_help=False)
JSON.add_argument("--json", action="store_true", help="print machine-readable JSON")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit 2 through our own path with one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def emit(args: argparse.Namespace, data: Any, human: str | Callable[[Any], str]) -> None:
    """Print ``data`` as JSON with ``--json``, else the human rendering."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        text = human(data) if callable(human) else human
        if text:
            print(text)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain left-aligned text table."""
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def build_parser(prog: str, description: str, modules: Sequence[str]) -> argparse.ArgumentParser:
    """A parser with the global options and every command module's subcommands."""
    parser = _Parser(prog=prog, description=description)
    parser.add_argument("--config", metavar="PATH",
                        help="host config (default: $STELLAR_CONFIG, "
                             "then ~/.config/stellarium/host.toml)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def run(prog: str, description: str, modules: Sequence[str],
        argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the chosen subcommand, and turn failures into exit codes."""
    try:
        args = build_parser(prog, description, modules).parse_args(argv)
        return int(args.func(args) or 0)
    except StellarError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except OSError as exc:
        # A path the user named cannot be read or written: say which and why, no traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
