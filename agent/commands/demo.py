"""`demo`: the whole flow on this machine with an embedded S3 server and a small generated model."""

from __future__ import annotations

import argparse
from typing import Any

from agent.engines import ENGINES
from agent.output import Output
from agent.settings import Settings


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "demo", help="run stage + pull + offline check against an embedded SeaweedFS, then clean up")
    parser.add_argument("--shards", type=int, default=4, help="safetensors shards (default 4)")
    parser.add_argument("--shard-mib", type=int, default=8, help="MiB per shard (default 8)")
    parser.add_argument("--engine", choices=ENGINES, default="auto")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder for inspection")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from agent.demo import run_demo  # the test bed (SeaweedFS, safetensors) is needed only here

    del settings  # the demo configures its own embedded server and cache
    run_demo(out, shards=args.shards, shard_bytes=args.shard_mib << 20, engine=args.engine, keep=args.keep)
    out.event("demo.done", "demo finished: the agent staged, pulled and proved a model end to end")
    return 0
