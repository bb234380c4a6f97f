"""`list`: the models staged in the bucket, with commits, file counts and sizes."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.output import Output, human_bytes
from agent.remote import staged_models
from agent.s3read import open_reader
from agent.settings import Settings


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser("list", help="the models staged in the bucket")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    store = open_reader(settings)
    store.check_bucket()
    rows = staged_models(store)
    if args.json:
        for row in rows:
            sys.stdout.write(json.dumps(row.__dict__) + "\n")
        return 0
    header = f"{'MODEL':<40} {'REVISION':<10} {'COMMIT':<12} {'FILES':>5} {'SIZE':>10} FORM"
    print(header)
    for row in rows:
        print(f"{row.repo_id:<40} {row.revision:<10} {row.commit[:12]:<12} {row.files:>5} "
              f"{human_bytes(row.size):>10} {row.form}")
    if not rows:
        out.event("list.empty", f"no models staged under s3://{settings.bucket}/models/hf-cache/")
    return 0
