"""Every failure maps to a documented exit code with a one-line message: no exit 1, ever.

The exception types each engine can raise are enumerated from the libraries themselves (agent._native's
FetchError family, urllib3's HTTPError family, botocore's BotoCoreError family), so a type added there
later is covered or fails here; the README's exit-code table is parsed, so code and documentation agree.
"""

from __future__ import annotations

import errno
import importlib
import inspect
import pkgutil
import re
import ssl
import string
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
import urllib3.exceptions
from botocore.exceptions import ClientError

import agent
from agent import cli, s3read
from agent.engines.base import BlobJob, Part, TransferConfig
from agent.engines.python import PartTask, PythonEngine, _final_error, _Retryable
from agent.engines.s5cmd import S5cmdEngine, classify
from agent.errors import (
    AgentError,
    CredentialsError,
    DiskFullError,
    InternalError,
    LocalFileError,
    PermissionDeniedError,
    ReadOnlyError,
    ResourceLimitError,
    StorageUnavailableError,
    UntrustedCertificateError,
    as_agent_error,
)
from agent.policy import RetryPolicy, error_for_status, is_retryable
from agent.settings import Settings, Trust
from agent.store import Store
from agent.store import translate as store_translate
from agent.transport import untrusted_certificate

README = Path(__file__).resolve().parents[2] / "README.md"
ERRNOS = [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE,
          errno.ENOMEM, errno.EAGAIN, errno.ENOENT, errno.EISDIR, errno.EIO, None]


def documented_codes() -> set[int]:
    """The codes of the README's exit-code table (`| 130 / 143 | ...` counts as both)."""
    section = README.read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    codes: set[int] = set()
    for row in re.findall(r"^\| ([0-9 /]+) \|", section, flags=re.M):
        codes.update(int(c) for c in row.split("/"))
    return codes


DOCUMENTED = documented_codes()


def assert_mapped(error: object, *, code: int | None = None) -> AgentError:
    assert isinstance(error, AgentError), f"{error!r} is not an AgentError"
    assert error.exit_code in DOCUMENTED and error.exit_code not in (0, 1), (type(error), error.exit_code)
    if code is not None:
        assert error.exit_code == code, (type(error).__name__, str(error))
    line = error.one_line()
    assert "\n" not in line and line.startswith("error: ") and error.hint, line
    assert "X-Amz-Signature" not in line and "deadbeef" not in line
    return error


def case_id(value: object) -> str:
    return value if isinstance(value, str) else ""


def subclasses(cls: type) -> Iterator[type]:
    yield cls
    for sub in cls.__subclasses__():
        yield from subclasses(sub)


def test_the_readme_table_lists_the_codes_of_every_error_class_and_of_the_cli() -> None:
    for info in pkgutil.walk_packages(agent.__path__, "agent."):  # every AgentError subclass is defined
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    assert {0, 2, 3, 4, 5, 130, 143} == DOCUMENTED
    for cls in set(subclasses(AgentError)) - {AgentError}:  # the base is never raised itself
        assert cls.exit_code in DOCUMENTED - {0}, cls
        assert cls.hint, f"{cls.__name__} has no hint"


# -- agent._native ------------------------------------------------------------------------------------------

native = pytest.importorskip("agent._native")
from agent.engines.native import translate as native_translate  # noqa: E402

RUNTIME = "cannot start the transfer runtime"
NATIVE_MESSAGE = "/c/blobs/x.simswarm.part: bytes 0-9: {} (GET http://h/b/k?X-Amz-Signature=deadbeef)"


def native_cases() -> Iterator[tuple[str, Exception]]:
    """One or more instances of every exception class the extension exports, with realistic attributes,
    plus the builtins it raises (RuntimeError: its runtime cannot start; ValueError/OverflowError)."""
    exported = {getattr(native, n) for n in dir(native) if inspect.isclass(getattr(native, n))}
    family = set(subclasses(native.FetchError))
    assert family <= exported and len(family) == 6, family  # a new type must be added to the cases below
    attrs: dict[type, list[dict[str, Any]]] = {
        native.HttpStatusError: [{"status": s} for s in (400, 403, 404, 416, 429, 500, 503)],
        native.FileWriteError: [{"errno": e} for e in ERRNOS],
    }
    for cls in family:
        for extra in attrs.get(cls, [{}]):
            exc = cls(NATIVE_MESSAGE.format("Too many open files (os error 24)" if cls is native.TransferError
                                            else "boom"))
            for name, value in extra.items():
                setattr(exc, name, value)
            yield f"{cls.__name__}{extra}", exc
    yield "TransferError reset", native.TransferError(NATIVE_MESSAGE.format("connection reset by peer"))
    yield "CertificateError", native.CertificateError(NATIVE_MESSAGE.format(
        "TLS certificate refused: invalid peer certificate: UnknownIssuer"))
    yield "RuntimeError EMFILE", RuntimeError(f"{RUNTIME}: Too many open files (os error 24)")
    yield "RuntimeError EAGAIN", RuntimeError(f"{RUNTIME}: Resource temporarily unavailable")
    yield "ValueError", ValueError("/c/x: not a valid URL: http://h/b/k")
    yield "OverflowError", OverflowError("can't convert negative int to unsigned")


@pytest.mark.parametrize(("name", "exc"), list(native_cases()), ids=case_id)
def test_every_native_exception_maps_to_a_documented_code(name: str, exc: Exception) -> None:
    error = assert_mapped(native_translate(exc))  # type: ignore[arg-type]
    assert "deadbeef" not in error.one_line()


def test_native_errors_have_true_hints() -> None:
    emfile = native.FileWriteError(NATIVE_MESSAGE.format("Too many open files"))
    emfile.errno = errno.EMFILE
    assert isinstance(native_translate(emfile), ResourceLimitError)
    assert "ulimit -n" in native_translate(emfile).hint
    assert isinstance(native_translate(native.TransferError(NATIVE_MESSAGE.format("(os error 24)"))),
                      ResourceLimitError)
    runtime = native_translate(RuntimeError(f"{RUNTIME}: Too many open files (os error 24)"))
    assert isinstance(runtime, ResourceLimitError) and runtime.exit_code == 3  # the Hub fallback may deliver
    readonly = native.FileWriteError(NATIVE_MESSAGE.format("Read-only file system"))
    readonly.errno = errno.EROFS
    assert isinstance(native_translate(readonly), ReadOnlyError)
    assert isinstance(native_translate(ValueError("bad")), InternalError)
    refused = native_translate(native.CertificateError(NATIVE_MESSAGE.format(
        "TLS certificate refused: invalid peer certificate: UnknownIssuer")))
    assert isinstance(refused, UntrustedCertificateError) and refused.exit_code == 2
    assert "signed by a CA that is not trusted" in str(refused) and "AWS_CA_BUNDLE" in refused.hint


def test_a_refused_certificate_is_a_configuration_error_in_every_client(tmp_path: Path) -> None:
    """Each TLS stack's words for a refused certificate: exit 2, the problem named, never a stall."""
    verify = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
                                             "Hostname mismatch, certificate is not valid for 'localhost'.")
    urllib3_error = urllib3.exceptions.SSLError(verify)
    found = untrusted_certificate(urllib3_error, "https://h/b/k", Trust())
    assert found is not None and "another host name" in str(found) and "the system store" in str(found)
    assert untrusted_certificate(urllib3.exceptions.SSLError("wrong version number"), "h", Trust()) is None
    go = ('ERROR "cp s3://b/k /c/x": RequestError: send request failed caused by: Get "https://h/b/k": '
          "tls: failed to verify certificate: x509: certificate signed by unknown authority")
    assert isinstance(classify([go], 1, 1, 2, ["secret"]), UntrustedCertificateError)
    boto = botocore.exceptions.SSLError(endpoint_url="https://h", error=verify)
    assert isinstance(store_translate(boto, "k"), UntrustedCertificateError)


# -- the python engine -------------------------------------------------------------------------------------


def urllib3_cases() -> Iterator[tuple[str, Exception]]:
    for cls in sorted(set(subclasses(urllib3.exceptions.HTTPError)), key=lambda c: c.__name__):
        exc = cls.__new__(cls)
        Exception.__init__(exc, "HTTPConnectionPool(host='h'): Max retries with url: /b/k?X-Amz-Signature=x")
        for _ in range(3):  # a few classes format their text from attributes their __init__ would set
            try:
                str(exc)
                break
            except AttributeError as missing:
                setattr(exc, missing.name, 0)
        yield cls.__name__, exc


PYTHON_CASES = [*urllib3_cases(),
                *[(f"OSError {e}", OSError(e, "boom")) for e in ERRNOS if e is not None],
                ("ConnectionResetError", ConnectionResetError(errno.ECONNRESET, "reset")),
                ("NewConnectionError EMFILE", urllib3.exceptions.NewConnectionError(
                    None, "Failed to establish a new connection: [Errno 24] Too many open files")),
                ("retryable", _Retryable("HTTP 503")), ("digest", _Retryable("part digest mismatch"))]


@pytest.mark.parametrize(("name", "exc"), PYTHON_CASES, ids=[c[0] for c in PYTHON_CASES])
def test_every_python_engine_failure_maps_to_a_documented_code(name: str, exc: Exception,
                                                               tmp_path: Path) -> None:
    task = PartTask("http://h/b/k?X-Amz-Signature=x", str(tmp_path / "blob"), 10, Part(0, 0, 10),
                    TransferConfig())
    error = assert_mapped(_final_error(task, exc))
    if "EMFILE" in name or name == f"OSError {errno.EMFILE}":
        assert isinstance(error, ResourceLimitError) and "ulimit -n" in error.hint
    if name in ("ConnectionResetError", "ProtocolError", "ReadTimeoutError"):
        assert isinstance(error, StorageUnavailableError)


def test_the_python_engine_maps_a_part_file_it_cannot_open(tmp_path: Path) -> None:
    """The worker opens the part file before its retry loop: that OSError used to escape unmapped."""
    job = BlobJob("b" * 40, "k", "http://127.0.0.1:9/b/k", 10, tmp_path / "no" / "part", (Part(0, 0, 10),))
    with pytest.raises(AgentError) as caught:
        PythonEngine(processes=1).fetch([job], TransferConfig(retry=RetryPolicy(max_retries=0)),
                                        lambda n: None, lambda j, p: None)
    assert isinstance(assert_mapped(caught.value, code=2), LocalFileError)


def test_a_worker_that_dies_is_a_resource_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(*args: Any) -> None:
        raise BrokenProcessPool("A process in the process pool was terminated abruptly")

    monkeypatch.setattr(PythonEngine, "_run", broken)
    job = BlobJob("b" * 40, "k", "http://127.0.0.1:9/b/k", 10, tmp_path / "part", (Part(0, 0, 10),))
    with pytest.raises(ResourceLimitError) as caught:
        PythonEngine(processes=1).fetch([job], TransferConfig(), lambda n: None, lambda j, p: None)
    assert_mapped(caught.value, code=3)


# -- the s5cmd engine --------------------------------------------------------------------------------------

S5CMD_STDERR = {
    "ERROR \"cp s3://b/k /c/x\": write /c/x: no space left on device": DiskFullError,
    "ERROR \"cp s3://b/k /c/x\": open /c/x: too many open files": ResourceLimitError,
    "ERROR \"cp s3://b/k /c/x\": open /c/x: read-only file system": ReadOnlyError,
    "ERROR \"cp s3://b/k /c/x\": open /c/x: permission denied": PermissionDeniedError,
    "ERROR \"cp s3://b/k /c/x\": AccessDenied: Access Denied status code: 403": CredentialsError,
    "ERROR \"cp s3://b/k /c/x\": NoSuchKey: status code: 404": AgentError,
    "ERROR \"cp s3://b/k /c/x\": RequestError: send request failed: refused": StorageUnavailableError,
    "something nobody listed": StorageUnavailableError,
}


@pytest.mark.parametrize("line", sorted(S5CMD_STDERR))
def test_every_s5cmd_failure_maps_to_a_documented_code(line: str) -> None:
    error = assert_mapped(classify([line], 1, 1, 2, ["secret"]))
    assert isinstance(error, S5CMD_STDERR[line])


def test_the_s5cmd_engine_maps_a_binary_it_cannot_start(tmp_path: Path) -> None:
    part = tmp_path / "part"
    part.write_bytes(b"\0" * 10)
    job = BlobJob("b" * 40, "k", "", 10, part, (Part(0, 0, 10),))
    settings = Settings.from_env({"MINIO_ENDPOINT": "127.0.0.1:9", "MINIO_ACCESS_KEY": "a",
                                  "MINIO_SECRET_KEY": "s", "HF_HOME": str(tmp_path)})
    engine = S5cmdEngine(settings, executable=str(tmp_path / "no-s5cmd-here"))
    with pytest.raises(AgentError) as caught:
        engine.fetch([job], TransferConfig(), lambda n: None, lambda j, p: None)
    assert_mapped(caught.value, code=2)


# -- the store (botocore) ----------------------------------------------------------------------------------


def botocore_cases() -> Iterator[tuple[str, Exception]]:
    classes = {c for c in vars(botocore.exceptions).values()
               if inspect.isclass(c) and issubclass(c, botocore.exceptions.BotoCoreError)}
    for cls in sorted(classes, key=lambda c: c.__name__):
        fields = {name for _, name, _, _ in string.Formatter().parse(cls.fmt) if name}
        try:
            yield cls.__name__, cls(**dict.fromkeys(fields, "x"))
        except TypeError:  # a class with its own positional constructor
            exc = cls.__new__(cls)
            exc.kwargs = {}
            Exception.__init__(exc, cls.__name__)
            yield cls.__name__, exc
    for code, status in [("NoSuchKey", 404), ("NoSuchBucket", 404), ("AccessDenied", 403),
                         ("SignatureDoesNotMatch", 403), ("InvalidAccessKeyId", 403), ("SlowDown", 503),
                         ("InternalError", 500), ("RequestTimeTooSkewed", 403),
                         ("AuthorizationHeaderMalformed", 400), ("InvalidRequest", 400), ("", 301)]:
        response: Any = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        yield f"ClientError {code or status}", ClientError(response, "GetObject")


@pytest.mark.parametrize(("name", "exc"), list(botocore_cases()), ids=case_id)
def test_every_botocore_failure_maps_to_a_documented_code(name: str, exc: Exception) -> None:
    error = assert_mapped(store_translate(exc, "listing 'models/'"))
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        assert isinstance(error, CredentialsError) and error.exit_code == 2


class OneObject:
    """A client whose GETs fail as `failures` says, in order (an exception class to raise from the
    request, or "body" for a body that breaks while read), then answer b"abc"."""

    def __init__(self, *failures: object) -> None:
        self.failures = list(failures)
        self.calls = 0

    def get_object(self, **_: object) -> dict[str, Any]:
        self.calls += 1
        failure = self.failures.pop(0) if self.failures else None
        if isinstance(failure, type):
            raise failure(endpoint_url="http://h")

        class Body:
            def read(self) -> bytes:
                if failure == "body":
                    raise botocore.exceptions.IncompleteReadError(actual_bytes=1, expected_bytes=3)
                return b"abc"

        return {"ContentLength": 3, "Body": Body()}


def test_the_store_sends_no_request_again_that_botocore_gave_up_on() -> None:
    client = OneObject(botocore.exceptions.EndpointConnectionError)
    with pytest.raises(StorageUnavailableError):
        Store(Settings.from_env({}), client=client).get_bytes("k")  # type: ignore[arg-type]
    assert client.calls == 1  # botocore's retries were the one layer


def test_the_store_reads_again_a_body_that_broke() -> None:
    client = OneObject("body")
    assert Store(Settings.from_env({}), client=client).get_bytes("k") == b"abc"  # type: ignore[arg-type]
    assert client.calls == 2


# -- the failure policy: one map from an HTTP answer to an error, whoever read it ---------------------------

STATUS_CASES = [(status, code) for status in (400, 401, 403, 404, 408, 416, 429, 500, 503)
                for code in ("", "NoSuchKey", "NoSuchBucket", "AccessDenied", "AuthorizationHeaderMalformed")]


@pytest.mark.parametrize(("status", "code"), STATUS_CASES)
def test_every_reader_maps_an_http_answer_as_the_policy_does(status: int, code: str) -> None:
    expected = type(assert_mapped(error_for_status(status, "k", code=code)))
    response: Any = {"Error": {"Code": code or str(status)}, "ResponseMetadata": {"HTTPStatusCode": status}}
    assert type(store_translate(ClientError(response, "GetObject"), "k")) is expected
    body = f"<Error><Code>{code}</Code></Error>".encode() if code else b""
    answer = s3read._status_error(status, body, "1", "k")
    retried = isinstance(answer, s3read._Retry)
    assert type(answer.error if isinstance(answer, s3read._Retry) else answer) is expected
    assert retried == (is_retryable(status) and expected is StorageUnavailableError)
    if not code:  # the native engine's HttpStatusError carries the status only
        exc = native.HttpStatusError(NATIVE_MESSAGE.format("boom"))
        exc.status = status
        assert type(native_translate(exc)) is expected


# -- the command line ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyError("k"), ValueError("v?X-Amz-Signature=s"),
                                 OSError(errno.EMFILE, "Too many open files"), AssertionError()])
def test_anything_else_is_one_line_with_a_documented_code(exc: Exception) -> None:
    assert_mapped(as_agent_error(exc))


def test_an_unforeseen_exception_in_a_command_exits_3_in_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def explode(*args: Any) -> int:
        raise RuntimeError("something nobody foresaw")

    monkeypatch.setattr("agent.commands.list_cmd.run", explode)
    assert cli.main(["--log-format", "text", "list"]) == 3
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: unexpected RuntimeError: something nobody foresaw (a bug")
