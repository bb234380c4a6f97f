"""`serve MODEL [pull options] [--vllm-bin PATH] [--no-overlap] [-- VLLM_ARGS...]`: pull (with the Hub
fallback) and exec `vllm serve`, offline, on the filled cache.

By default vLLM is exec'd as soon as the files it reads before any weight are in place, while a
background process goes on pulling the weights (`agent.serving`); `--no-overlap` (or
SIMSWARM_OVERLAP=false), a load format chosen by the user, or a vLLM without the plugin keep the order
of `pull`, then exec.

argparse cannot mix options after a positional with a `--` section in one pass (and strips or keeps a
`--` depending on where it stands), so MODEL and everything after it are taken verbatim as one
REMAINDER, which keeps every `--` on all Python versions, and split here: MODEL first, our options up
to the first `--` (parsed again), vLLM's arguments after it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from agent.commands.pull import (
    ENVIRONMENT_HELP,
    add_pull_options,
    options_from,
    selection_from,
    summarize,
    write_report,
)
from agent.errors import Interrupted, UsageError
from agent.fallback import pull_with_fallback
from agent.launch import exec_vllm, flag_value, redact_argv, resolve_vllm_bin, vllm_argv, vllm_env
from agent.output import Output
from agent.pull import Handoff, PullOptions, PullResult
from agent.serving import background
from agent.serving.arrivals import ENV_ARRIVALS, ENV_BACKGROUND_PID, ENV_MAIN_PID, ENV_STATUS_FD, LOAD_FORMAT
from agent.serving.probe import Probe
from agent.settings import Settings

SEPARATOR = "--"


def add_serve_options(parser: argparse.ArgumentParser, *, with_model: bool) -> None:
    add_pull_options(parser, with_model=with_model, files_default="vllm")
    parser.add_argument("--vllm-bin", metavar="PATH",
                        help="the vLLM executable (default: $SIMSWARM_VLLM_BIN, else `vllm` on PATH)")
    parser.add_argument("--no-overlap", action="store_true",
                        help="pull every file before starting vLLM (default: start vLLM once its configs "
                             "and tokenizer are in place, the weights following); also "
                             "SIMSWARM_OVERLAP=false")


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "serve", help="pull the model, then exec `vllm serve` on it (offline)",
        description="Pull MODEL (bucket first, Hub fallback), then replace this process with "
                    "`vllm serve MODEL --served-model-name MODEL VLLM_ARGS`; vLLM's arguments go after `--`.",
        epilog=ENVIRONMENT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_options(parser, with_model=False)
    parser.add_argument("rest", nargs=argparse.REMAINDER, metavar="MODEL [options] [-- VLLM_ARGS ...]",
                        help="Hugging Face repo id, pull options, then `--` and vLLM's own arguments")
    parser.set_defaults(func=run)


def split_rest(rest: Sequence[str]) -> tuple[list[str], list[str]]:
    """(our options, vLLM's arguments): split at the first `--`."""
    rest = list(rest)
    if SEPARATOR in rest:
        cut = rest.index(SEPARATOR)
        return rest[:cut], rest[cut + 1:]
    return rest, []


class _OptionsParser(argparse.ArgumentParser):
    """Reports a bad option as one UsageError line instead of usage text and SystemExit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"serve: {message}; vLLM's own arguments go after `--`")


def parse_after_model(args: argparse.Namespace) -> list[str]:
    """Set `args.model`, parse the options given after MODEL into `args`; returns vLLM's arguments."""
    rest = list(args.rest)
    if rest[:1] == [SEPARATOR]:  # `serve --opt X -- MODEL ...`: a `--` before MODEL only ends our options
        rest = rest[1:]
    if not rest or rest[0].startswith("-"):
        raise UsageError("serve needs MODEL, a Hugging Face repo id, before any `--`")
    args.model = rest[0]
    ours, theirs = split_rest(rest[1:])
    if ours:
        parser = _OptionsParser(prog="simswarm-agent serve MODEL", add_help=False)
        add_serve_options(parser, with_model=False)
        parser.parse_args(ours, namespace=args)
    return theirs


def load_format_for(args: argparse.Namespace, vllm_args: Sequence[str]) -> str | None:
    """The load format vLLM will run with, which the file choice must follow: vLLM's own
    `--load-format` when given (it must agree with ours), else the agent's."""
    theirs = flag_value(vllm_args, "--load-format")
    if theirs is not None:
        theirs = theirs.lower()
        if args.load_format is not None and args.load_format != theirs:
            raise UsageError(f"serve: --load-format {args.load_format} disagrees with vLLM's --load-format "
                             f"{theirs}", hint="give the load format once, after `--`")
        return theirs
    ours: str | None = args.load_format
    return ours


def overlap_refusal(args: argparse.Namespace, settings: Settings, load_format: str | None) -> str | None:
    """Why vLLM must wait for the whole pull (None: it may start while the weights arrive)."""
    if args.no_overlap:
        return "--no-overlap"
    if not settings.overlap:
        return "SIMSWARM_OVERLAP is off"
    if load_format is not None:
        return f"the load format {load_format!r} was chosen, and only the plugin's own starts early"
    if not hasattr(os, "fork") or not sys.platform.startswith("linux"):
        return "the background pull needs Linux"
    return None


def run(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    vllm_args = parse_after_model(args)
    settings = settings.with_hf_home(args.hf_home)
    vllm_bin = resolve_vllm_bin(args.vllm_bin, settings)  # before the pull: fail in seconds, not minutes
    load_format = load_format_for(args, vllm_args)
    opts = options_from(args, settings, selection_from(args, load_format))
    refusal = overlap_refusal(args, settings, load_format)
    if refusal is None:
        return serve_overlapped(args, settings, out, opts, vllm_bin, vllm_args)
    out.event("serve.order", f"pulling every file before vLLM starts: {refusal}", reason=refusal)
    result = pull_with_fallback(settings, opts, out, allow_fallback=not args.no_fallback,
                                write_back=args.write_back)
    write_report(args.report, result)
    summarize(result, out)
    # An explicit format the files were chosen for goes to vLLM too, so it cannot pick another.
    chosen_for = load_format if opts.selection.files == "vllm" and load_format != "auto" else None
    start_vllm(opts, vllm_args, vllm_bin, settings, out, commit=result.commit, load_format=chosen_for)
    return 0  # not reached: exec_vllm replaces the process or raises


def start_vllm(opts: PullOptions, vllm_args: list[str], vllm_bin: str, settings: Settings, out: Output, *,
               commit: str, load_format: str | None, extra_env: dict[str, str] | None = None) -> None:
    argv = vllm_argv(opts.repo_id, vllm_args, vllm_bin=vllm_bin, revision=opts.revision, commit=commit,
                     load_format=load_format)
    shown = redact_argv(argv)
    out.event("serve.exec", f"starting vLLM: {' '.join(shown)}", argv=shown)
    exec_vllm(argv, {**vllm_env(os.environ, settings), **(extra_env or {})})


def serve_overlapped(args: argparse.Namespace, settings: Settings, out: Output, opts: PullOptions,
                     vllm_bin: str, vllm_args: list[str]) -> int:
    """The pull in a background process; vLLM exec'd once its first files are in place (see
    `agent.serving.background`). Returns only with the background pull's exit code, when it failed."""

    def pull(handoff: Handoff) -> PullResult:
        return pull_with_fallback(settings, opts, out, allow_fallback=not args.no_fallback,
                                  write_back=args.write_back, handoff=handoff)

    def finish(result: PullResult) -> None:
        write_report(args.report, result)
        summarize(result, out)

    pulling = background.start(opts.selection.load_format, out, pull, finish, debug=args.debug)
    probe = Probe(vllm_bin)  # vLLM's interpreter answers while the first files are fetched
    try:
        report = pulling.next_report()
        refusal = probe.why_not() if report is not None and report.get("stage") == "first" else None
        if refusal is not None:
            out.event("serve.order", f"waiting for every file before vLLM starts: {refusal}", reason=refusal)
            report = pulling.next_report()
    except Interrupted:
        return pulling.stop()  # the background pull says so in its own line
    finally:
        probe.close()
    if report is None or report.get("stage") not in ("done", "first"):
        code = pulling.wait()
        if report is None:  # it ended without a word (a crash, a kill): say so, in its place
            out.error(f"error: the pull ended without a report (exit {code})", code or 1)
        return code or 1  # else it failed and said why in its one line
    if report["stage"] == "done":  # complete already, or delivered whole (the Hub): vLLM's own loader
        pulling.wait()
        start_vllm(opts, vllm_args, vllm_bin, settings, out, commit=str(report.get("commit", "")),
                   load_format=None)
    os.set_inheritable(pulling.status_fd, True)  # vLLM's main process reads the rest of the reports
    extra = {ENV_ARRIVALS: str(report["arrivals"]), ENV_BACKGROUND_PID: str(pulling.pid),
             ENV_STATUS_FD: str(pulling.status_fd), ENV_MAIN_PID: str(os.getpid())}
    start_vllm(opts, vllm_args, vllm_bin, settings, out, commit=str(report.get("commit", "")),
               load_format=LOAD_FORMAT, extra_env=extra)
    return 0  # not reached: exec_vllm replaces the process or raises
