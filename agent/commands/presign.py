"""`presign JOB_ID [--upload] [--expires SECONDS] [--direct]`: a job's presigned artifact URLs (operators).

Prints the JSON map `{file: url}` on stdout (the same map the API hands out, so it can feed
`upload-artifacts --urls`). The URLs are credentials: they go to stdout only, never to the log.
"""

from __future__ import annotations

import argparse
import json
import sys

from agent.artifacts import DOWNLOAD_EXPIRES, UPLOAD_EXPIRES, SimDataStorage
from agent.errors import EXIT_OK, ConfigError
from agent.output import Output
from agent.settings import Settings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "presign",
        help="print an artifact job's presigned download (or upload) URLs as JSON",
        description="Print the JSON map {file: presigned URL} for the artifacts of JOB_ID: GET URLs "
                    f"({DOWNLOAD_EXPIRES}s, through MINIO_PROXY_BASE when set) or, with --upload, PUT URLs "
                    f"({UPLOAD_EXPIRES}s).",
    )
    parser.add_argument("job_id", metavar="JOB_ID", help="the simulation job id (sim-data/JOB_ID/)")
    parser.add_argument("--upload", action="store_true", help="presign PUT URLs for the GPU pod instead")
    parser.add_argument("--expires", type=int, metavar="SECONDS", default=None,
                        help="lifetime in seconds, 1..604800 (default: 3600 for GET, 50400 for PUT)")
    parser.add_argument("--direct", action="store_true",
                        help="download URLs at MINIO_ENDPOINT even when MINIO_PROXY_BASE is set")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    storage = SimDataStorage(settings)
    if not storage.enabled:
        raise ConfigError("object storage is not configured: MINIO_ENDPOINT is not set",
                          hint="set MINIO_ENDPOINT, MINIO_ACCESS_KEY and MINIO_SECRET_KEY")
    default = UPLOAD_EXPIRES if args.upload else DOWNLOAD_EXPIRES
    expires = default if args.expires is None else args.expires  # --expires 0 is refused, not defaulted
    if args.upload:
        urls = storage.generate_upload_urls(args.job_id, expires=expires)
    else:
        urls = storage.generate_download_urls(args.job_id, True, expires=expires, via_proxy=not args.direct)
    assert urls is not None  # storage is enabled and the flag is set
    sys.stdout.write(json.dumps(urls, indent=2) + "\n")
    sys.stdout.flush()
    kind = "upload" if args.upload else "download"
    out.event("presigned", f"presigned {len(urls)} {kind} URLs for job {args.job_id}",
              job_id=args.job_id, kind=kind, files=len(urls))
    return EXIT_OK
