"""A private certificate authority made in the test with the `openssl` CLI, as a cluster's own CA is.

`make_pki(folder)` writes a CA (`ca.pem`), a server certificate it signed for 127.0.0.1 only
(`server.pem`, `server.key`; no DNS name, so `https://localhost:...` is a host name mismatch) and an
unrelated CA (`other-ca.pem`) that trusts nothing the server shows. EC P-256 keys: fast to make.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SERVER_EXTENSIONS = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
"""


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate, PEM: what AWS_CA_BUNDLE / SSL_CERT_FILE name
    other_ca: Path  # a CA that did not sign the server's certificate
    certificate: Path  # the server's certificate, PEM
    key: Path  # its private key

    def hashed_folder(self, folder: Path) -> Path:
        """An SSL_CERT_DIR holding the CA under OpenSSL's `<subject hash>.0` name (what c_rehash makes)."""
        folder.mkdir(parents=True, exist_ok=True)
        subject_hash = _openssl("x509", "-hash", "-noout", "-in", str(self.ca)).strip()
        shutil.copyfile(self.ca, folder / f"{subject_hash}.0")
        return folder


@dataclass(frozen=True)
class TlsEndpoint:
    """An https endpoint (nginx terminating TLS in front of the test S3 server) and the CA behind it."""

    url: str  # https://127.0.0.1:PORT
    pki: Pki


def openssl_available() -> bool:
    return shutil.which("openssl") is not None


def _openssl(*args: str) -> str:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr[-2000:]}")
    return done.stdout


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=simswarm test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _make_ca(folder, "ca")
    other_ca, _ = _make_ca(folder, "other-ca")
    key, request, cert = folder / "server.key", folder / "server.csr", folder / "server.pem"
    (folder / "server.ext").write_text(SERVER_EXTENSIONS)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(request), "-subj", "/CN=127.0.0.1")
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", str(cert), "-days", "2", "-extfile", str(folder / "server.ext"))
    return Pki(ca, other_ca, cert, key)
