"""A real nginx reverse proxy on a free loopback port, in front of the test S3 server.

Everything nginx writes (pid, logs, temp bodies) stays in the given directory; `nginx -c conf -p dir`
runs in the foreground (`daemon off`) as a child of the test, and `stop()` ends it.

The configuration is the one `agent.artifacts` documents for presigned download URLs: sign against the
internal endpoint, forward with `proxy_set_header Host <the signed host>` and the request URI unchanged.
`host_header=None` renders the other common setup (`Host $http_host`, pass the client's Host through),
which must make those URLs fail: the tests use it to show the Host handling is what makes them verify.

`tls=(certificate, key)` makes nginx terminate TLS on its port (`listen ... ssl`), as an ingress or a
MinIO with its own certificate would: the tests' https endpoint (tests/support/tls.py makes the CA).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"
START_ATTEMPTS = 3


def nginx_binary() -> str | None:
    """The nginx executable (Debian installs it in /usr/sbin, often not on a user's PATH), or None."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def render_config(root: Path, port: int, upstream: str, *, host_header: str | None, prefix: str = "",
                  tls: tuple[Path, Path] | None = None) -> str:
    """nginx.conf proxying http://127.0.0.1:<port><prefix>/... to `upstream` (`http://host:port`).

    With a prefix the remainder of the *raw* request URI is forwarded (a `map` over $request_uri), so a
    percent-encoded key reaches the S3 server byte for byte, as it was signed.
    """
    host = "$http_host" if host_header is None else host_header
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    if prefix:
        prefix = "/" + prefix.strip("/")
        uri_map = f'map $request_uri $s3_uri {{ "~^{prefix}(?<rest>/.*)$" $rest; default /; }}'
        location, target = f"{prefix}/", f"{upstream}$s3_uri"
    else:
        uri_map, location, target = "", "/", upstream  # no URI part: the request URI passes unchanged
    tmp = root / "tmp"
    listen, certificate = f"{HOST}:{port}", ""
    if tls is not None:
        listen += " ssl"
        certificate = f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};"
    return f"""
daemon off;
worker_processes 1;
{user}
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 256; }}
http {{
    # $request would log each presigned URL's query string (a credential): log the path only.
    log_format no_query '$remote_addr [$time_local] "$request_method $uri" $status $body_bytes_sent';
    access_log {root}/access.log no_query;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    {uri_map}
    server {{
        listen {listen};
        {certificate}
        client_max_body_size 0;        # artifacts can be large: no 413 on presigned PUTs
        proxy_request_buffering off;   # stream request bodies straight to the S3 server
        proxy_buffering off;
        proxy_http_version 1.1;
        location {location} {{
            proxy_pass {target};
            proxy_set_header Host {host};  # SigV4 signed the Host header
        }}
    }}
}}
"""


class NginxProxy:
    """One nginx master (and worker) proxying to `upstream`; use as a context manager."""

    def __init__(self, root: Path, upstream: str, *, host_header: str | None, prefix: str = "",
                 binary: str | None = None, startup_timeout: float = 10.0,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.root = root
        self.upstream = upstream.rstrip("/")
        self.host_header = host_header
        self.prefix = ("/" + prefix.strip("/")) if prefix.strip("/") else ""
        self.binary = binary or nginx_binary()
        self.startup_timeout = startup_timeout
        self.tls = tls
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """The public base URL, as MINIO_PROXY_BASE would name it."""
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}{self.prefix}"

    @property
    def conf_path(self) -> Path:
        return self.root / "nginx.conf"

    def log_tail(self, name: str = "error.log", limit: int = 4000) -> str:
        try:
            return (self.root / name).read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def start(self) -> NginxProxy:
        if self.binary is None:
            raise RuntimeError("nginx is not installed")
        for sub in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port()
            self.conf_path.write_text(render_config(self.root, self.port, self.upstream,
                                                    host_header=self.host_header, prefix=self.prefix,
                                                    tls=self.tls))
            command = [self.binary, "-c", str(self.conf_path), "-p", str(self.root),
                       "-e", str(self.root / "error.log")]
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                start_new_session=True,  # master and worker form one group that stop() can always end
            )
            if self._wait_ready():
                return self
            self.stop()
            if "Address already in use" not in self.log_tail() or attempt == START_ATTEMPTS:
                break
        raise RuntimeError(f"nginx did not start; error.log tail:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        """SIGTERM the master (fast shutdown; it ends its worker), then wait; SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def __enter__(self) -> NginxProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
