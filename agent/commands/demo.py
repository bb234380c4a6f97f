"""`demo`: the whole flow on this machine with an embedded S3 server and a small generated model."""

from __future__ import annotations

import argparse
import time
from typing import Any

from agent.engines import ENGINES
from agent.errors import UsageError
from agent.output import Output
from agent.settings import Settings

MAX_SHARDS = 256
MAX_SHARD_MIB = 4096  # the demo generates and stores the model twice: keep it a demo


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "demo", help="run stage + pull + offline check against an embedded SeaweedFS, then clean up")
    parser.add_argument("--shards", type=int, default=4, help="safetensors shards (default 4)")
    parser.add_argument("--shard-mib", type=int, default=8, help="MiB per shard (default 8)")
    parser.add_argument("--engine", choices=ENGINES, default="auto")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder for inspection")
    parser.set_defaults(func=run)


def check_sizes(shards: int, shard_mib: int) -> None:
    for flag, value, most in (("--shards", shards, MAX_SHARDS), ("--shard-mib", shard_mib, MAX_SHARD_MIB)):
        if not 1 <= value <= most:
            raise UsageError(f"{flag} must be between 1 and {most}, got {value}")


def run(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    check_sizes(args.shards, args.shard_mib)  # before a server starts or a byte is generated
    from agent.demo.run import run_demo  # the test bed (SeaweedFS, safetensors) is needed only here

    del settings  # the demo configures its own embedded server and cache
    started = time.monotonic()
    run_demo(out, shards=args.shards, shard_bytes=args.shard_mib << 20, engine=args.engine, keep=args.keep)
    seconds = time.monotonic() - started
    out.event("demo.done", f"demo finished in {seconds:.1f}s: the agent staged, pulled and proved a model "
              "end to end", seconds=round(seconds, 3))
    return 0
