"""`upload-artifacts DIR --urls FILE`: the GPU pod PUTs its artifacts to the presigned URLs it was handed.

Prints a JSON summary on stdout: `{"ok", "uploaded", "missing", "failed": {file: reason}, "bytes_uploaded"}`.
Exit 0 when every file present in DIR was uploaded (missing files are reported, not fatal), 3 if any failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.errors import EXIT_NOT_AVAILABLE, EXIT_OK, ConfigError
from agent.output import Output
from agent.settings import Settings
from agent.uploader import UPLOAD_RETRY, load_url_map, upload_artifacts, with_attempts


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "upload-artifacts",
        help="PUT a job's artifact files to their presigned URLs (run on the GPU pod)",
        description="Upload each artifact of the URL map found in DIR with a plain HTTP PUT, retrying "
                    "transient failures; print a JSON summary. Needs no storage credentials.",
    )
    parser.add_argument("directory", metavar="DIR", type=Path, help="the directory holding the artifacts")
    parser.add_argument("--urls", metavar="FILE", type=Path, required=True,
                        help="the JSON map {file: presigned PUT URL} the API handed out")
    parser.add_argument("--attempts", type=int, default=UPLOAD_RETRY.attempts, metavar="N",
                        help=f"tries per file (default {UPLOAD_RETRY.attempts})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    directory: Path = args.directory
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory", hint="pass the directory holding the artifacts")
    if args.attempts < 1:
        raise ConfigError("--attempts must be at least 1", hint="see `simswarm-agent upload-artifacts -h`")
    urls = load_url_map(args.urls)

    def on_event(name: str, message: str, fields: Mapping[str, Any]) -> None:
        out.event(name, message, **fields)

    summary = upload_artifacts(directory, urls, policy=with_attempts(args.attempts), on_event=on_event)
    sys.stdout.write(json.dumps(summary.as_dict(), indent=2) + "\n")
    sys.stdout.flush()
    if summary.ok:
        out.event("upload_done", f"uploaded {len(summary.uploaded)} artifacts "
                  f"({len(summary.missing)} missing)", uploaded=len(summary.uploaded))
        return EXIT_OK
    out.error(f"error: {len(summary.failed)} artifact upload(s) failed: {', '.join(summary.failed)} "
              "(see the summary on stdout; ask the API for fresh URLs if they expired)", EXIT_NOT_AVAILABLE)
    return EXIT_NOT_AVAILABLE
