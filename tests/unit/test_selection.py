"""The vLLM-aware file selection over plain file lists: the repo shapes vLLM 0.32.0 meets (Llama 3.x with
Meta's original/, .bin beside .safetensors, Mistral's consolidated beside HF shards, .bin only), the
load formats, the index filter, the fall-backs to "everything", and the --include/--exclude patterns."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

import pytest

from agent.selection import Selection, choose, resolve_format, vllm_weights

COMMON = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", ".gitattributes", "README.md", "LICENSE"]
ST_SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
BIN_SHARDS = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]


def index_of(files: Iterable[str]) -> bytes:
    files = list(files)
    return json.dumps({"metadata": {}, "weight_map": {f"t{i}": f for i, f in enumerate(files)}}).encode()


def reader(indexes: dict[str, bytes]) -> tuple[Callable[[str], bytes | None], list[str]]:
    calls: list[str] = []

    def read(path: str) -> bytes | None:
        calls.append(path)
        return indexes.get(path)
    return read, calls


def vllm(paths: list[str], indexes: dict[str, bytes] | None = None, **kw: object):  # type: ignore[no-untyped-def]
    read, _ = reader(indexes or {})
    return choose(paths, Selection("vllm", **kw), read)  # type: ignore[arg-type]


def test_llama3_skips_meta_original_folder_and_keeps_every_other_file() -> None:
    paths = [*COMMON, *ST_SHARDS, "model.safetensors.index.json", "original/consolidated.00.pth",
             "original/params.json", "original/tokenizer.model"]
    choice = vllm(paths, {"model.safetensors.index.json": index_of(ST_SHARDS)})
    assert choice.load_format == "hf"
    assert set(choice.skipped) == {"original/consolidated.00.pth", "original/params.json",
                                   "original/tokenizer.model"}
    assert choice.keep == set(paths) - set(choice.skipped)


def test_safetensors_beat_bin_and_the_bin_index_goes_with_its_shards() -> None:
    paths = [*COMMON, *ST_SHARDS, "model.safetensors.index.json", *BIN_SHARDS, "pytorch_model.bin.index.json"]
    choice = vllm(paths, {"model.safetensors.index.json": index_of(ST_SHARDS)})
    assert set(choice.skipped) == {*BIN_SHARDS, "pytorch_model.bin.index.json"}
    assert {*ST_SHARDS, "model.safetensors.index.json"} <= choice.keep


def test_mistral_consolidated_wins_under_auto_with_its_params_and_tekken() -> None:
    paths = [*COMMON, *ST_SHARDS, "model.safetensors.index.json", "consolidated.safetensors", "params.json",
             "tekken.json"]
    read, calls = reader({"model.safetensors.index.json": index_of(ST_SHARDS)})
    choice = choose(paths, Selection("vllm"), read)
    assert choice.load_format == "mistral"
    assert set(choice.skipped) == {*ST_SHARDS, "model.safetensors.index.json"}
    assert {"consolidated.safetensors", "params.json", "tekken.json", "config.json"} <= choice.keep
    assert calls == []  # no consolidated.safetensors.index.json: nothing to read


def test_mistral_repo_loaded_as_safetensors_drops_consolidated_and_params_json_together() -> None:
    paths = [*COMMON, *ST_SHARDS, "model.safetensors.index.json", "consolidated.safetensors", "params.json",
             "tekken.json"]
    choice = vllm(paths, {"model.safetensors.index.json": index_of(ST_SHARDS)}, load_format="safetensors")
    assert choice.load_format == "safetensors"
    assert set(choice.skipped) == {"consolidated.safetensors", "params.json"}
    assert choice.notes == ()


def test_index_filter_keeps_only_weight_map_files() -> None:
    paths = [*COMMON, *ST_SHARDS, "model.safetensors.index.json", "extra-merged.safetensors"]
    choice = vllm(paths, {"model.safetensors.index.json": index_of(ST_SHARDS)})
    assert set(choice.skipped) == {"extra-merged.safetensors"}


def test_bin_only_repo_drops_training_leftovers() -> None:
    paths = [*COMMON, "pytorch_model.bin", "training_args.bin", "optimizer.pt", "scheduler.pt"]
    read, calls = reader({})
    choice = choose(paths, Selection("vllm"), read)
    assert choice.load_format == "hf"
    assert set(choice.skipped) == {"training_args.bin", "optimizer.pt", "scheduler.pt"}
    assert calls == []  # the safetensors index is never wanted on the .bin path


def test_pt_only_when_nothing_better_and_other_frameworks_are_skipped() -> None:
    paths = [*COMMON, "model.pt", "tf_model.h5", "flax_model.msgpack", "rust_model.ot"]
    choice = vllm(paths)
    assert choice.keep == set(COMMON) | {"model.pt"}
    assert vllm_weights(paths, "auto", lambda _: None).files == ("model.pt",)


def test_glob_top_level_only_and_no_dotfiles() -> None:
    weights = vllm_weights(["model.safetensors", ".cache.safetensors", "sub/model-x.safetensors"], "auto",
                           lambda _: None)
    assert weights.files == ("model.safetensors",)


def test_weights_in_other_subfolders_are_kept() -> None:
    paths = [*COMMON, "model.safetensors", "2_Dense/model.safetensors", "modules.json"]
    assert vllm(paths).skipped == {}


def test_mistral_detection_looks_at_basenames_outside_original() -> None:
    assert resolve_format(["a/consolidated.safetensors", "model.safetensors"], "auto") == "mistral"
    assert resolve_format(["original/consolidated.safetensors", "model.safetensors"], "auto") == "hf"
    assert resolve_format(["model.safetensors"], "fastsafetensors") == "safetensors"


def test_index_naming_a_missing_shard_keeps_everything_with_a_note() -> None:
    paths = [*COMMON, ST_SHARDS[0], "model.safetensors.index.json", "original/consolidated.00.pth"]
    choice = vllm(paths, {"model.safetensors.index.json": index_of(ST_SHARDS)})
    assert choice.keep == set(paths) and not choice.skipped
    assert "would find no weights" in choice.notes[0]


def test_no_weights_vllm_would_load_keeps_everything() -> None:
    paths = [*COMMON, "model-q4.gguf"]
    choice = vllm(paths)
    assert choice.keep == set(paths)
    assert choice.notes


def test_unmirrored_load_format_keeps_everything() -> None:
    paths = [*COMMON, *ST_SHARDS, *BIN_SHARDS]
    choice = vllm(paths, load_format="tensorizer")
    assert choice.keep == set(paths)
    assert "not mirrored" in choice.notes[0]


def test_all_reads_nothing_and_keeps_everything() -> None:
    paths = [*COMMON, *ST_SHARDS, "model.safetensors.index.json", "original/consolidated.00.pth"]
    read, calls = reader({})
    choice = choose(paths, Selection("all"), read)
    assert choice.keep == set(paths) and not choice.skipped and calls == []


@pytest.mark.parametrize(("include", "exclude", "kept"), [
    (("*.json",), (), {"config.json", "model.safetensors.index.json", "original/params.json"}),
    ((), ("original/",), {"config.json", "model.safetensors.index.json", "model.safetensors", "README.md"}),
    (("*.safetensors", "config.json"), ("model.*",), {"config.json"}),
])
def test_include_exclude_follow_huggingface_hub_patterns(include: tuple[str, ...], exclude: tuple[str, ...],
                                                         kept: set[str]) -> None:
    paths = ["config.json", "model.safetensors.index.json", "model.safetensors", "README.md",
             "original/params.json", "original/consolidated.00.pth"]
    choice = choose(paths, Selection("all", include=include, exclude=exclude), lambda _: None)
    assert choice.keep == kept
    assert set(choice.skipped) == set(paths) - kept
    assert all(why == "left out by --include/--exclude" for why in choice.skipped.values())


def test_patterns_narrow_the_vllm_selection_too() -> None:
    paths = [*COMMON, "model.safetensors", "original/consolidated.00.pth"]
    choice = vllm(paths, exclude=("README.md",))
    assert choice.skipped == {"README.md": "left out by --include/--exclude",
                              "original/consolidated.00.pth": "original/** is in vLLM's ignore_patterns"}


def test_breaking_both_or_neither_by_hand_is_noted() -> None:
    paths = [*COMMON, "consolidated.safetensors", "params.json"]
    choice = choose(paths, Selection("all", exclude=("consolidated*",)), lambda _: None)
    assert choice.keep == set(COMMON) | {"params.json"}
    assert "params.json but not consolidated" in choice.notes[0]
