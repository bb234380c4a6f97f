"""`pull MODEL [--revision REV] [--hf-home DIR] [--engine ...] [--verify size|full] [--no-fallback]
[--write-back] [--report FILE] [--files vllm|all] [--include GLOB] [--exclude GLOB] [--load-format F]`:
the bucket first, the Hub only when the bucket cannot deliver. `pull` fills the whole snapshot by
default (a dev box's cache serves transformers and scripts too); `serve` defaults to `--files vllm`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from agent.cache import atomic_write, check_repo_id
from agent.engines import ENGINES
from agent.engines.base import TransferConfig
from agent.errors import UsageError
from agent.fallback import pull_with_fallback
from agent.output import Output, human_bytes
from agent.pull import PullOptions, PullResult
from agent.selection import FILES_CHOICES, LOAD_FORMATS, VLLM_VERSION, Selection
from agent.settings import Settings


def add_pull_options(parser: argparse.ArgumentParser, *, with_model: bool = True,
                     files_default: str = "all") -> None:
    """The options `pull` and `serve` share (`serve` re-parses them after MODEL, without it)."""
    if with_model:
        parser.add_argument("model", help="Hugging Face repo id, e.g. Qwen/Qwen3-14B")
    parser.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    parser.add_argument("--hf-home", type=Path, metavar="DIR",
                        help="HF_HOME to fill (the cache goes to DIR/hub); default from the environment")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="transfer engine (auto: native when available, else python)")
    parser.add_argument("--verify", choices=["full", "size"], default="full",
                        help="full: hash every blob (default); size: sizes only, for trusted paths")
    parser.add_argument("--rehash", action="store_true",
                        help="re-hash every blob, even those verified earlier and unchanged since")
    parser.add_argument("--concurrency", type=int, default=None, metavar="N",
                        help="parallel ranged GETs (default: sized to the machine)")
    parser.add_argument("--no-fallback", action="store_true",
                        help="never fall back to the Hugging Face Hub")
    parser.add_argument("--write-back", action="store_true",
                        help="after a Hub fallback, stage the model into the bucket for the next pod")
    parser.add_argument("--report", type=Path, metavar="FILE", help="write a JSON report of the pull")
    add_selection_options(parser, files_default)


def add_selection_options(parser: argparse.ArgumentParser, files_default: str) -> None:
    parser.add_argument("--files", choices=FILES_CHOICES, default=files_default,
                        help=f"vllm: only the files vLLM {VLLM_VERSION} reads (weights in the format it "
                             "picks, every config and tokenizer file); all: the whole snapshot "
                             f"(default: {files_default})")
    parser.add_argument("--include", action="append", default=None, metavar="GLOB",
                        help="pull only paths matching GLOB (huggingface_hub allow_patterns; repeatable)")
    parser.add_argument("--exclude", action="append", default=None, metavar="GLOB",
                        help="never pull paths matching GLOB (huggingface_hub ignore_patterns; repeatable)")
    parser.add_argument("--load-format", choices=LOAD_FORMATS, default=None,
                        help="the vLLM load format the vllm selection mirrors (default: auto, or the "
                             "--load-format given to vLLM after `--`)")


# Shown under `pull --help` and `serve --help`: a new user's first question is where the bucket is set.
ENVIRONMENT_HELP = """environment:
  MINIO_ENDPOINT                      host:port or http(s) URL of the S3 server; unset: storage is off
  MINIO_ACCESS_KEY, MINIO_SECRET_KEY  the bucket's credentials (never printed or logged)
  MINIO_BUCKET                        bucket (default: simswarm)
  MINIO_SECURE                        true for https with host:port (default: false)
  MINIO_REGION                        SigV4 signing region (default: us-east-1)
  HF_HOME, HF_HUB_CACHE               where the cache goes (as huggingface_hub reads them)
  HF_TOKEN, HF_ENDPOINT               for the Hugging Face fallback

exit codes: 0 ready, 2 usage or configuration, 3 model not available, 4 verification failed,
5 not enough disk, 130/143 interrupted"""


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "pull", help="fill the local cache from the bucket", epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pull_options(parser)
    parser.set_defaults(func=run)


def selection_from(args: argparse.Namespace, load_format: str | None = None) -> Selection:
    return Selection(args.files, load_format or args.load_format or "auto", tuple(args.include or ()),
                     tuple(args.exclude or ()))


def options_from(args: argparse.Namespace, settings: Settings,
                 selection: Selection | None = None) -> PullOptions:
    """The pull the flags ask for, with its transfer config: `--concurrency` streams (else sized to the
    machine) under the settings' deadlines and retry counts."""
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {args.concurrency}")
    transfer = TransferConfig.sized(args.concurrency, settings.deadlines)
    return PullOptions(check_repo_id(args.model), args.revision, args.engine, args.verify, args.rehash,
                       args.concurrency, selection or selection_from(args), transfer)


def write_report(path: Path | None, result: PullResult) -> None:
    if path is not None:
        atomic_write(path, json.dumps(result.to_json(), indent=2).encode())


def summarize(result: PullResult, out: Output) -> None:
    rate = result.bytes_downloaded / result.seconds if result.seconds else 0.0
    skipped = (f"; skipped {result.files_skipped} files, {human_bytes(result.bytes_skipped)} saved"
               if result.files_skipped else "")
    out.event("pull.done",
              f"ready: {result.repo_id}@{result.commit[:12]} at {result.snapshot_path} "
              f"({human_bytes(result.bytes_downloaded)} downloaded in {result.seconds:.1f}s, "
              f"{human_bytes(rate)}/s, source {result.source}, engine {result.engine}{skipped})",
              **result.to_json())


def run(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    settings = settings.with_hf_home(args.hf_home)
    result = pull_with_fallback(settings, options_from(args, settings), out,
                                allow_fallback=not args.no_fallback, write_back=args.write_back)
    write_report(args.report, result)
    summarize(result, out)
    return 0
