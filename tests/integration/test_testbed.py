"""The test bed itself: the real S3 server, the generated model, the fake Hub and the cache that the real
huggingface_hub writes through it. If these fail, every other integration test means nothing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import urllib3
from botocore.exceptions import ClientError
from huggingface_hub import scan_cache_dir

from agent.demo.model import generate_model
from agent.demo.seaweed import SeaweedServer, s3_client
from agent.settings import Settings
from agent.store import Store
from tests.support.fake_hub import FakeHub, git_blob_sha1, read_tree
from tests.support.hf_cache import build_hf_cache, resolve_offline

HTTP = urllib3.PoolManager(retries=False, timeout=10)


def _status(exc: ClientError) -> int:
    return int(exc.response["ResponseMetadata"]["HTTPStatusCode"])


# -- the S3 server ------------------------------------------------------------------------------------


def test_s3_server_round_trips_an_object_with_sigv4(s3_server: SeaweedServer, bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="models/a b/ü.bin", Body=b"x" * 1000)
    body = client.get_object(Bucket=bucket, Key="models/a b/ü.bin")["Body"].read()
    listed = client.list_objects_v2(Bucket=bucket, Prefix="models/")
    assert body == b"x" * 1000
    assert [o["Key"] for o in listed["Contents"]] == ["models/a b/ü.bin"]


def test_s3_server_refuses_a_wrong_secret(s3_server: SeaweedServer, bucket: str) -> None:
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=b"v")
    intruder = s3_client(s3_server.endpoint_url, s3_server.access_key, "not-the-secret", attempts=1)
    with pytest.raises(ClientError) as caught:
        intruder.get_object(Bucket=bucket, Key="k")
    assert _status(caught.value) == 403


def test_s3_server_answers_a_ranged_get_with_206(s3_server: SeaweedServer, bucket: str) -> None:
    data = os.urandom(300_000)
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="blob", Body=data)
    part = client.get_object(Bucket=bucket, Key="blob", Range="bytes=100000-199999")
    assert part["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert part["ContentRange"] == f"bytes 100000-199999/{len(data)}"
    assert part["Body"].read() == data[100000:200000]


def test_s3_server_checks_presigned_urls(s3_server: SeaweedServer, bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="report.md", Body=b"# report")
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "report.md"},
                                        ExpiresIn=60)
    assert "X-Amz-Signature=" in url  # SigV4 query auth, not SigV2
    assert HTTP.request("GET", url).data == b"# report"
    tampered = url.replace("report.md", "other.md")
    assert HTTP.request("GET", tampered).status == 403


def test_settings_fixture_points_the_agent_at_this_tests_bucket(settings: Settings, bucket: str,
                                                                 tmp_path: Path) -> None:
    store = Store(settings)
    store.put_bytes("models/hf-cache/probe", b"hello")
    assert settings.bucket == bucket
    assert store.get_bytes("models/hf-cache/probe") == b"hello"
    assert settings.hub_cache == tmp_path / "hf-home" / "hub"


def test_two_servers_run_side_by_side_and_stop_cleanly(s3_server: SeaweedServer) -> None:
    second = SeaweedServer()
    with second:
        assert set(second.ports).isdisjoint(s3_server.ports)
        second.create_bucket("other")
        second.client().put_object(Bucket="other", Key="k", Body=b"second")
        assert second.client().get_object(Bucket="other", Key="k")["Body"].read() == b"second"
        assert s3_server.running
        data_dir, pid = second.data_dir, second.pid
        assert data_dir is not None and pid is not None
        assert (data_dir / "weed.log").stat().st_size > 0
    assert not second.running
    assert not data_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing of the group is left
    assert not list(Path("/tmp").glob(f"seaweedfs-*-{second.s3_port}.sock"))


# -- the generated model ------------------------------------------------------------------------------


def _shard_tensors(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), "np") as shard:
        assert shard.metadata() == {"format": "pt"}
        return {name: tuple(shard.get_slice(name).get_shape()) for name in shard.keys()}  # noqa: SIM118


def assert_model_is_consistent(model_dir: Path) -> None:
    """config.json parses, the index names exactly the tensors in the shards, and shapes fit the config."""
    config = json.loads((model_dir / "config.json").read_text())
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    found: dict[str, tuple[int, ...]] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = _shard_tensors(model_dir / shard)
        assert all(index["weight_map"][name] == shard for name in tensors)
        found.update(tensors)
    assert set(found) == set(index["weight_map"])
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    kv_width = config["num_key_value_heads"] * config["head_dim"]
    assert found["model.embed_tokens.weight"] == (vocab, hidden)
    assert found["lm_head.weight"] == (vocab, hidden)
    last = config["num_hidden_layers"] - 1
    assert found[f"model.layers.{last}.self_attn.k_proj.weight"] == (kv_width, hidden)
    assert found[f"model.layers.{last}.mlp.down_proj.weight"] == (hidden, config["intermediate_size"])
    itemsize = {"float32": 4, "float16": 2}[config["torch_dtype"]]
    total = sum(itemsize * _prod(shape) for shape in found.values())
    assert index["metadata"]["total_size"] == total


def _prod(shape: tuple[int, ...]) -> int:
    result = 1
    for dim in shape:
        result *= dim
    return result


def test_generated_model_is_deterministic_and_self_consistent(tmp_path: Path) -> None:
    first = generate_model(tmp_path / "a", shards=3, shard_bytes=64 * 1024, seed=7)
    again = generate_model(tmp_path / "b", shards=3, shard_bytes=64 * 1024, seed=7)
    other = generate_model(tmp_path / "c", shards=3, shard_bytes=64 * 1024, seed=8)
    assert list(first) == list(again)
    assert all(first[name].read_bytes() == again[name].read_bytes() for name in first)
    assert first["model-00003-of-00003.safetensors"].read_bytes() != \
        other["model-00003-of-00003.safetensors"].read_bytes()
    assert "original/params.json" in first
    shard_sizes = [path.stat().st_size for name, path in first.items() if name.endswith(".safetensors")]
    assert len(shard_sizes) == 3 and all(32 * 1024 < size < 128 * 1024 for size in shard_sizes)
    assert_model_is_consistent(tmp_path / "a")


def test_generated_model_in_float16_is_consistent(tmp_path: Path) -> None:
    generate_model(tmp_path, shards=1, shard_bytes=32 * 1024, dtype="float16")
    assert_model_is_consistent(tmp_path)


def test_generated_tokenizer_loads_with_tokenizers(tiny_model: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer.from_str((tiny_model / "tokenizer.json").read_text())
    assert tokenizer.get_vocab_size() == json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    assert tokenizer.encode("<s> w1 ! unknown </s>").ids[0] == 1


# -- the fake Hub and the cache huggingface_hub writes through it ------------------------------------------


def test_snapshot_download_through_the_fake_hub_writes_a_clean_cache(
    hf_cache_ro: Path, model_repo: tuple[str, str], fake_hub: FakeHub, tiny_model: Path
) -> None:
    repo_id, commit = model_repo
    report = scan_cache_dir(hf_cache_ro)
    assert report.warnings == []
    (repo,) = report.repos
    assert repo.repo_id == repo_id and [r.commit_hash for r in repo.revisions] == [commit]

    repo_dir = hf_cache_ro / "models--simswarm-test--tiny-llama"
    assert (repo_dir / "refs" / "main").read_bytes() == commit.encode()  # no trailing newline
    snapshot = repo_dir / "snapshots" / commit
    published = fake_hub.files(repo_id)
    for relpath, entry in published.items():
        link = snapshot / relpath
        depth = relpath.count("/")
        assert os.readlink(link) == "../" * (depth + 2) + f"blobs/{entry.etag}"
        assert link.read_bytes() == (tiny_model / relpath).read_bytes()
    blobs = sorted(p.name for p in (repo_dir / "blobs").iterdir())
    assert blobs == sorted(entry.etag for entry in published.values())  # each blob once, named by its ETag

    # huggingface_hub 2.x keeps the tree listing: our manifest format (DESIGN.md §3).
    tree = json.loads((repo_dir / "trees" / f"{commit}.json").read_text())
    assert tree["format_version"] == 1
    for relpath, entry in published.items():
        expected = {"size": len(entry.data), "blob_id": entry.oid}
        if entry.sha256:
            expected.update(lfs_sha256=entry.sha256, lfs_size=len(entry.data))
            assert hashlib.sha256(entry.data).hexdigest() == entry.sha256
        else:
            assert git_blob_sha1(entry.data) == entry.oid
        assert tree["files"][relpath] == expected
    assert set(tree["files"]) == set(published)


def test_cached_model_opens_and_its_index_matches_its_shards(hf_cache_ro: Path,
                                                             model_repo: tuple[str, str]) -> None:
    snapshot = hf_cache_ro / "models--simswarm-test--tiny-llama" / "snapshots" / model_repo[1]
    assert json.loads((snapshot / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert_model_is_consistent(snapshot)


def test_offline_snapshot_download_resolves_the_cache(hf_cache: Path, model_repo: tuple[str, str]) -> None:
    repo_id, commit = model_repo
    expected = hf_cache / "models--simswarm-test--tiny-llama" / "snapshots" / commit
    assert resolve_offline(hf_cache, repo_id) == expected
    (hf_cache / "models--simswarm-test--tiny-llama" / "snapshots" / commit / "config.json").unlink()
    with pytest.raises(RuntimeError, match="IncompleteSnapshotError"):
        resolve_offline(hf_cache, repo_id)  # the tree listing lets it notice the missing file


def test_fake_hub_answers_errors_as_the_hub_does(fake_hub: FakeHub, model_repo: tuple[str, str]) -> None:
    repo_id, commit = model_repo
    base = fake_hub.endpoint
    cases = {
        "/api/models/nobody/nothing/revision/main": "RepoNotFound",
        f"/api/models/{repo_id}/revision/v9": "RevisionNotFound",
        f"/{repo_id}/resolve/v9/config.json": "RevisionNotFound",
        f"/{repo_id}/resolve/main/missing.json": "EntryNotFound",
    }
    for path, code in cases.items():
        response = HTTP.request("GET", base + path)
        assert (response.status, response.headers.get("X-Error-Code")) == (404, code), path
    missing = HTTP.request("HEAD", f"{base}/{repo_id}/resolve/main/missing.json")
    assert missing.headers["X-Repo-Commit"] == commit


def test_fake_hub_serves_files_with_etags_and_ranges(fake_hub: FakeHub, model_repo: tuple[str, str]) -> None:
    repo_id, commit = model_repo
    files = fake_hub.files(repo_id)
    shard = files["model-00001-of-00002.safetensors"]
    url = f"{fake_hub.endpoint}/{repo_id}/resolve/main/{shard.path}"

    head = HTTP.request("HEAD", url)
    assert head.status == 200 and head.data == b""
    assert head.headers["ETag"] == f'"{shard.sha256}"'
    assert head.headers["X-Repo-Commit"] == commit
    assert int(head.headers["Content-Length"]) == len(shard.data)
    assert not any(name.lower().startswith("x-xet") for name in head.headers)
    config_head = HTTP.request("HEAD", f"{fake_hub.endpoint}/{repo_id}/resolve/{commit}/config.json")
    assert config_head.headers["ETag"] == f'"{files["config.json"].oid}"'

    part = HTTP.request("GET", url, headers={"Range": "bytes=10-19"})
    assert part.status == 206 and part.data == shard.data[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(shard.data)}"
    tail = HTTP.request("GET", url, headers={"Range": "bytes=-5"})
    assert tail.data == shard.data[-5:]
    beyond = HTTP.request("GET", url, headers={"Range": f"bytes={len(shard.data)}-"})
    assert beyond.status == 416


def test_fake_hub_faults_and_token(tiny_model: Path) -> None:
    with FakeHub(token="hf_secret") as hub:
        hub.add_repo("org/private", {"config.json": b"{}"})
        url = f"{hub.endpoint}/org/private/resolve/main/config.json"
        anonymous = HTTP.request("GET", url)
        assert (anonymous.status, anonymous.headers.get("X-Error-Code")) == (401, "RepoNotFound")
        assert HTTP.request("GET", url, headers={"Authorization": "Bearer wrong"}).status == 401
        auth = {"Authorization": "Bearer hf_secret"}
        assert HTTP.request("GET", url, headers=auth).data == b"{}"

        hub.fail_next(2, 503, path_contains="/resolve/")
        assert [HTTP.request("GET", url, headers=auth).status for _ in range(3)] == [503, 503, 200]
        hub.available = False
        assert HTTP.request("GET", url, headers=auth).status == 503
        hub.available = True
        hub.drop_next(1, after=1)
        with pytest.raises(urllib3.exceptions.ProtocolError):
            HTTP.request("GET", url, headers=auth)
        assert hub.count("GET", "/resolve/") == 8


def test_real_client_follows_tree_pagination(tiny_model: Path, tmp_path: Path) -> None:
    with FakeHub(tree_page_size=3) as hub:
        hub.add_repo("org/tiny", read_tree(tiny_model))
        snapshot = build_hf_cache(hub, "org/tiny", tmp_path / "hub")
        assert read_tree(snapshot) == read_tree(tiny_model)
        assert hub.count("GET", "/tree/") >= 4


def test_real_client_resumes_a_cut_download_with_a_range(tmp_path: Path) -> None:
    # huggingface_hub hands the body on in 10 MiB chunks: only a cut after the first chunk leaves
    # something to resume from.
    chunk = 10 * 1024 * 1024
    payload = hashlib.sha256(b"seed").digest() * ((chunk + 65536) // 32)
    with FakeHub() as hub:
        hub.add_repo("org/big", {"big.bin": payload, "config.json": b"{}"})
        hub.drop_next(1, after=chunk + 4096, path_contains="big.bin")
        snapshot = build_hf_cache(hub, "org/big", tmp_path / "hub")
        assert (snapshot / "big.bin").read_bytes() == payload
        assert hub.count("GET", "/big.bin") == 2
        assert hub.range_requests == [(f"/org/big/resolve/{snapshot.name}/big.bin", f"bytes={chunk}-")]
