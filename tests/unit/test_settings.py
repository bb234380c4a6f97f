"""Settings: every variable of README "Configuration", read once, with huggingface_hub's cache precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.settings import Settings, Trust, normalize_endpoint


def test_minio_sdk_style_endpoint_takes_scheme_from_secure() -> None:
    assert normalize_endpoint("minio:9000", secure=False) == "http://minio:9000"
    assert normalize_endpoint("minio:9000", secure=True) == "https://minio:9000"


def test_full_url_endpoint_is_kept_without_trailing_slash() -> None:
    assert normalize_endpoint("https://s3.example.com:9443/", secure=False) == "https://s3.example.com:9443"


@pytest.mark.parametrize("bad", ["ftp://x:1", "http://", "http://u:p@host:9000", "host:notaport", "http://h/?q=1"])
def test_malformed_endpoint_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError):
        normalize_endpoint(bad, secure=False)


def test_defaults_when_nothing_is_set(tmp_path: Path) -> None:
    s = Settings.from_env({"HOME": str(tmp_path)})
    assert s.endpoint_url is None and not s.storage_enabled
    assert s.bucket == "simswarm"
    # MINIO_SECURE is off unless set: a host:port endpoint is plain http
    assert Settings.from_env({"MINIO_ENDPOINT": "minio:9000"}).endpoint_url == "http://minio:9000"


def test_hub_cache_precedence_follows_huggingface_hub() -> None:
    assert Settings.from_env({"HF_HOME": "/h"}).hub_cache == Path("/h/hub")
    assert Settings.from_env({"HF_HOME": "/h", "HF_HUB_CACHE": "/c"}).hub_cache == Path("/c")
    assert Settings.from_env({"XDG_CACHE_HOME": "/x"}).hub_cache == Path("/x/huggingface/hub")
    assert Settings.from_env({"HUGGINGFACE_HUB_CACHE": "/old"}).hub_cache == Path("/old")


def test_hf_home_flag_wins_over_environment() -> None:
    s = Settings.from_env({"HF_HUB_CACHE": "/c"}).with_hf_home("/flag")
    assert s.hub_cache == Path("/flag/hub") and s.hf_home == Path("/flag")


def test_secrets_never_in_repr() -> None:
    s = Settings.from_env({"MINIO_ENDPOINT": "h:1", "MINIO_SECRET_KEY": "s3cr3t-value", "HF_TOKEN": "hf_tok"})
    assert "s3cr3t-value" not in repr(s) and "hf_tok" not in repr(s)


@pytest.mark.parametrize(("env", "offline"), [
    ({}, None),
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE"),
    ({"HF_HUB_OFFLINE": " True "}, "HF_HUB_OFFLINE"),
    ({"TRANSFORMERS_OFFLINE": "yes"}, "TRANSFORMERS_OFFLINE"),  # huggingface_hub takes it for offline too
    ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, None),  # the first one set decides, as there
    ({"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "ON"}, "TRANSFORMERS_OFFLINE"),
    ({"TRANSFORMERS_OFFLINE": "off"}, None),
])
def test_hub_offline_reads_both_variables_as_huggingface_hub_does(env: dict[str, str],
                                                                  offline: str | None) -> None:
    assert Settings.from_env(env).hub_offline == offline


def test_transformers_offline_forbids_the_hub_fallback_and_names_itself() -> None:
    from agent.fallback import fallback_refusal

    refusal = fallback_refusal(True, Settings.from_env({"TRANSFORMERS_OFFLINE": "1"}))
    assert refusal is not None and "TRANSFORMERS_OFFLINE" in refusal
    assert fallback_refusal(True, Settings.from_env({})) is None


def test_no_child_process_keeps_the_storage_secrets() -> None:
    from agent.engines.s5cmd import child_env
    from agent.launch import vllm_env

    base = {"PATH": "/usr/bin", "MINIO_ENDPOINT": "h:1", "MINIO_ACCESS_KEY": "ak", "MINIO_SECRET_KEY": "sk",
            "AWS_ACCESS_KEY_ID": "aws-ak", "AWS_SECRET_ACCESS_KEY": "aws-sk", "AWS_SESSION_TOKEN": "tok",
            "AWS_SECURITY_TOKEN": "old-tok"}
    settings = Settings.from_env(base)
    for env in (vllm_env(base, settings), child_env(settings, base)):
        assert not {"aws-ak", "aws-sk", "tok", "old-tok"} & set(env.values())
        assert "MINIO_ACCESS_KEY" not in env and "MINIO_SECRET_KEY" not in env and env["PATH"] == "/usr/bin"
    assert not {"ak", "sk"} & set(vllm_env(base, settings).values())
    s5cmd = child_env(settings, base)  # s5cmd gets the agent's own keys, and only those
    assert (s5cmd["AWS_ACCESS_KEY_ID"], s5cmd["AWS_SECRET_ACCESS_KEY"]) == ("ak", "sk")


def test_require_storage_explains_itself() -> None:
    with pytest.raises(ConfigError, match="MINIO_ENDPOINT"):
        Settings.from_env({}).require_storage()


def test_trust_follows_one_rule() -> None:
    """AWS_CA_BUNDLE alone when set; else SSL_CERT_FILE with SSL_CERT_DIR; else the system store."""
    from agent.settings import trust_from_env

    both = {"AWS_CA_BUNDLE": "/a.pem", "SSL_CERT_FILE": "/f.pem", "SSL_CERT_DIR": "/d"}
    assert trust_from_env(both) == Trust(Path("/a.pem"), None, "AWS_CA_BUNDLE=/a.pem")
    pair = trust_from_env({"SSL_CERT_FILE": "/f.pem", "SSL_CERT_DIR": "/d"})
    assert (pair.ca_file, pair.ca_dir, pair.source) == (Path("/f.pem"), Path("/d"),
                                                         "SSL_CERT_FILE=/f.pem and SSL_CERT_DIR=/d")
    assert trust_from_env({"SSL_CERT_DIR": "/d"}).ca_file is None
    assert trust_from_env({"AWS_CA_BUNDLE": " "}).is_system
    assert trust_from_env({}).source == "the system store"
    assert trust_from_env({"AWS_CA_BUNDLE": "/a.pem"}).boto_verify() == "/a.pem"


def test_a_named_ca_file_is_checked_only_for_an_https_endpoint(tmp_path: Path) -> None:
    missing = {"AWS_CA_BUNDLE": str(tmp_path / "none.pem"), "MINIO_ENDPOINT": "minio:9000"}
    assert Settings.from_env(missing).trust.ca_file == tmp_path / "none.pem"  # plain http: not used
    with pytest.raises(ConfigError, match="cannot read it"):
        Settings.from_env({**missing, "MINIO_SECURE": "true"})
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="no PEM certificate"):
        Settings.from_env({"SSL_CERT_FILE": str(tmp_path / "key.pem"), "MINIO_ENDPOINT": "https://m:9000"})
    with pytest.raises(ConfigError, match="not a folder"):
        Settings.from_env({"SSL_CERT_DIR": str(tmp_path / "nope"), "MINIO_ENDPOINT": "https://m:9000"})
