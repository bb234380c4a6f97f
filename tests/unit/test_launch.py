"""What vLLM would receive: argv and environment built by the pure functions of agent.launch."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import pytest

from agent.commands.pull import add_parser as add_pull_parser
from agent.commands.pull import selection_from
from agent.commands.serve import add_parser, load_format_for, parse_after_model, split_rest
from agent.errors import EXIT_USAGE, LaunchError, UsageError
from agent.launch import flag_value, has_flag, redact_argv, resolve_vllm_bin, vllm_argv, vllm_env
from agent.selection import Selection
from agent.settings import Settings

MODEL = "Qwen/Qwen3-14B"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_argv_names_the_served_model_after_the_repo_id() -> None:
    assert vllm_argv(MODEL, ["--max-model-len", "4096"]) == [
        "vllm", "serve", MODEL, "--served-model-name", MODEL, "--max-model-len", "4096"]


@pytest.mark.parametrize("theirs", [["--served-model-name", "mine"], ["--served-model-name=mine"]])
def test_argv_keeps_the_users_served_model_name(theirs: list[str]) -> None:
    argv = vllm_argv(MODEL, theirs)
    assert argv == ["vllm", "serve", MODEL, *theirs]
    assert argv.count("--served-model-name") + sum(a.startswith("--served-model-name=") for a in argv) == 1


def test_argv_pins_a_non_main_revision_to_its_commit() -> None:
    assert vllm_argv(MODEL, [], revision="v1.0", commit=COMMIT)[-2:] == ["--revision", COMMIT]
    assert "--revision" not in vllm_argv(MODEL, [], revision="main", commit=COMMIT)
    theirs = vllm_argv(MODEL, ["--revision=x"], revision="v1.0", commit=COMMIT)
    assert theirs.count("--revision=x") == 1 and "--revision" not in theirs


def test_argv_runs_the_resolved_executable() -> None:
    assert vllm_argv(MODEL, [], vllm_bin="/opt/venv/bin/vllm")[:3] == ["/opt/venv/bin/vllm", "serve", MODEL]


def test_has_flag_matches_whole_flags_only() -> None:
    assert has_flag(["--served-model-name=x"], "--served-model-name")
    assert not has_flag(["--served-model-names", "x"], "--served-model-name")
    assert not has_flag(["x"], "--served-model-name")


def settings_for(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


def test_env_is_offline_points_at_the_cache_and_drops_storage_secrets(tmp_path: Path) -> None:
    base = {"PATH": "/usr/bin", "MINIO_ENDPOINT": "minio:9000", "MINIO_ACCESS_KEY": "ak",
            "MINIO_SECRET_KEY": "sk", "HF_HOME": str(tmp_path / "home"),
            "HF_TOKEN": "hf_x", "CUDA_VISIBLE_DEVICES": "0"}
    env = vllm_env(base, settings_for(base))
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["HF_HOME"] == str(tmp_path / "home")
    assert env["HF_HUB_CACHE"] == str(tmp_path / "home" / "hub")
    assert "MINIO_ACCESS_KEY" not in env and "MINIO_SECRET_KEY" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["MINIO_ENDPOINT"] == "minio:9000"
    assert "HF_HUB_OFFLINE" not in base  # the agent's own environment is untouched


def test_env_follows_hf_hub_cache_and_the_hf_home_flag(tmp_path: Path) -> None:
    base = {"HF_HOME": "/h", "HF_HUB_CACHE": str(tmp_path / "c")}
    assert vllm_env(base, settings_for(base))["HF_HUB_CACHE"] == str(tmp_path / "c")
    legacy = {"HUGGINGFACE_HUB_CACHE": "/old"}
    env = vllm_env(legacy, settings_for(legacy))
    assert env["HF_HUB_CACHE"] == "/old" and "HUGGINGFACE_HUB_CACHE" not in env
    moved = settings_for(base).with_hf_home(tmp_path / "flag")
    env = vllm_env(base, moved)
    assert (env["HF_HOME"], env["HF_HUB_CACHE"]) == (str(tmp_path / "flag"), str(tmp_path / "flag" / "hub"))


def executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def resolve(flag: str | None, env: dict[str, str]) -> str:
    """The executable `serve` would run with this environment (its settings and its PATH)."""
    return resolve_vllm_bin(flag, settings_for(env), env["PATH"])


def test_vllm_bin_flag_then_environment_then_path(tmp_path: Path) -> None:
    vllm = executable(tmp_path / "vllm")
    other = executable(tmp_path / "other-vllm")
    env = {"PATH": str(tmp_path)}
    assert resolve(None, env) == str(vllm)
    assert resolve(None, {**env, "SIMSWARM_VLLM_BIN": "other-vllm"}) == str(other)
    assert resolve(str(other), {**env, "SIMSWARM_VLLM_BIN": "nope"}) == str(other)


def test_missing_vllm_is_a_one_line_usage_error(tmp_path: Path) -> None:
    with pytest.raises(LaunchError) as info:
        resolve(None, {"PATH": str(tmp_path)})
    assert info.value.exit_code == EXIT_USAGE
    assert "\n" not in info.value.one_line() and "'vllm'" in info.value.one_line()
    with pytest.raises(LaunchError):
        resolve(str(tmp_path / "absent"), {"PATH": os.defpath})


def test_api_key_never_reaches_the_log() -> None:
    assert redact_argv(["vllm", "--api-key", "s3cret", "--api-key=s3cret", "--port", "1"]) == [
        "vllm", "--api-key", "***", "--api-key=***", "--port", "1"]


def serve_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_serve_splits_our_options_from_vllms_at_the_separator() -> None:
    args = serve_args([MODEL, "--revision", "v2", "--no-fallback", "--", "--revision", "x", "--port", "1"])
    assert parse_after_model(args) == ["--revision", "x", "--port", "1"]
    assert (args.model, args.revision, args.no_fallback) == (MODEL, "v2", True)
    before = serve_args(["--engine", "python", MODEL])
    assert parse_after_model(before) == [] and before.engine == "python" and before.revision == "main"


@pytest.mark.parametrize(("argv", "vllm"), [
    ([MODEL, "--", "--served-model-name", "x"], ["--served-model-name", "x"]),
    ([MODEL, "--", "--", "x"], ["--", "x"]),
    (["--no-fallback", "--", MODEL, "--", "-x"], ["-x"]),
    ([MODEL], []),
])
def test_serve_keeps_every_separator_where_it_stands(argv: list[str], vllm: list[str]) -> None:
    args = serve_args(argv)
    assert parse_after_model(args) == vllm
    assert args.model == MODEL


@pytest.mark.parametrize("argv", [[], ["--"], ["--", "--port", "1"], ["--no-fallback"]])
def test_serve_without_a_model_is_a_usage_error(argv: list[str]) -> None:
    with pytest.raises(UsageError, match="MODEL"):
        parse_after_model(serve_args(argv))


def test_serve_refuses_vllm_arguments_without_the_separator() -> None:
    with pytest.raises(UsageError, match="--max-model-len"):
        parse_after_model(serve_args([MODEL, "--max-model-len", "4"]))


def test_split_rest_keeps_a_second_separator_for_vllm() -> None:
    assert split_rest(["--no-fallback", "--", "a", "--", "b"]) == (["--no-fallback"], ["a", "--", "b"])
    assert split_rest([]) == ([], [])


# -- the file selection and vLLM's --load-format ---------------------------------------------------------


@pytest.mark.parametrize(("args", "value"), [
    (["--load-format", "pt"], "pt"), (["--load-format=mistral"], "mistral"), (["--load_format", "pt"], "pt"),
    (["--port", "1"], None), (["--load-format"], None), (["--load-format", "pt", "--load-format=hf"], "hf"),
])
def test_flag_value_reads_every_spelling_vllm_accepts(args: list[str], value: str | None) -> None:
    assert flag_value(args, "--load-format") == value


def test_argv_passes_the_load_format_the_files_were_chosen_for_unless_vllm_has_one() -> None:
    assert vllm_argv(MODEL, [], load_format="pt")[-2:] == ["--load-format", "pt"]
    theirs = vllm_argv(MODEL, ["--load-format=pt"], load_format="pt")
    assert theirs.count("--load-format=pt") == 1 and "--load-format" not in theirs
    assert "--load-format" not in vllm_argv(MODEL, [])


def test_serve_defaults_to_the_vllm_selection_and_pull_to_everything() -> None:
    args = serve_args([MODEL])
    parse_after_model(args)
    assert selection_from(args) == Selection("vllm")
    parser = argparse.ArgumentParser()
    add_pull_parser(parser.add_subparsers())
    pulled = parser.parse_args(["pull", MODEL, "--include", "*.json", "--exclude", "*.md", "--exclude", "x/"])
    assert selection_from(pulled) == Selection("all", "auto", ("*.json",), ("*.md", "x/"))


def test_serve_chooses_files_for_the_load_format_vllm_will_use() -> None:
    args = serve_args([MODEL, "--", "--load-format", "SAFETENSORS"])
    vllm_args = parse_after_model(args)
    assert load_format_for(args, vllm_args) == "safetensors"
    ours = serve_args([MODEL, "--load-format", "pt"])
    assert load_format_for(ours, parse_after_model(ours)) == "pt"
    both = serve_args([MODEL, "--load-format", "pt", "--", "--load-format=pt"])
    assert load_format_for(both, parse_after_model(both)) == "pt"


def test_serve_refuses_two_load_formats_that_disagree() -> None:
    args = serve_args([MODEL, "--load-format", "pt", "--", "--load-format", "safetensors"])
    with pytest.raises(UsageError, match="disagrees"):
        load_format_for(args, parse_after_model(args))
