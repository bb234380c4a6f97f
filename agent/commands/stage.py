"""`stage MODEL [--revision REV] [--from-cache DIR | --from-hub]`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.output import Output
from agent.settings import Settings
from agent.stage import download_from_hub, stage_from_cache


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "stage", help="upload a model from a local cache (or the Hub) into the bucket, compact form")
    parser.add_argument("model", help="Hugging Face repo id, e.g. Qwen/Qwen3-14B")
    parser.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--from-cache", type=Path, metavar="DIR",
                        help="a hub cache directory (default: HF_HUB_CACHE / $HF_HOME/hub)")
    source.add_argument("--from-hub", action="store_true",
                        help="download the snapshot with huggingface_hub first, then stage it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from agent.store import Store  # boto3: uploads need the SDK, and only this command pays for it

    hub_cache = args.from_cache or settings.hub_cache
    store = Store(settings)
    store.check_bucket()
    if args.from_hub:
        out.event("stage.hub", f"downloading {args.model}@{args.revision} from the Hub into {hub_cache}")
        download_from_hub(args.model, args.revision, hub_cache, settings.hf_token)
    stage_from_cache(store, hub_cache, args.model, args.revision, out)
    return 0
