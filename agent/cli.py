"""Argument parsing, output mode, and the one table from errors to exit codes.

Each verb lives in `agent/commands/<verb>.py` with `add_parser(subparsers)`; the parser it adds sets
`func(args, settings, out) -> int`. This file only wires them and turns failures into one line.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from agent import __version__
from agent.commands import COMMANDS
from agent.errors import EXIT_USAGE, Interrupted, failure_line
from agent.output import Output
from agent.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simswarm-agent",
        description="Fill a Hugging Face cache from MinIO/S3, verify it, fall back to the Hub, launch vLLM.",
    )
    parser.add_argument("--version", action="version", version=f"simswarm-agent {__version__}")
    parser.add_argument("--debug", action="store_true", help="print a traceback on errors")
    parser.add_argument("--log-format", choices=["auto", "text", "json"], default="auto",
                        help="text on a terminal and JSON lines elsewhere by default")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGTERM (the pod being stopped) unwinds like Ctrl-C, so temp files are closed and kept for resume."""
    signal.signal(signal.SIGTERM, _raise_interrupted)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    json_mode = {"auto": None, "text": False, "json": True}[args.log_format]
    out = Output(json_mode=json_mode)
    install_signal_handlers()
    try:
        settings = Settings.from_env()
        code: int = args.func(args, settings, out)
        return code
    except BrokenPipeError:
        return EXIT_USAGE
    except (Interrupted, KeyboardInterrupt, Exception) as exc:  # every failure: one line, a documented code
        line, code = failure_line(exc, debug=args.debug)
        out.error(line, code)
        return code


if __name__ == "__main__":
    sys.exit(main())
