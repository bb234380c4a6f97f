#!/usr/bin/env bash
# The pod's ENTRYPOINT: maps the pod's environment to `simswarm-agent serve ...` and execs it, and the
# agent in turn execs vLLM, so vLLM ends up as the container's main process and gets its signals.
#
#   MODEL_ID              required: the Hugging Face repo id to serve (e.g. Qwen/Qwen3-14B)
#   MODEL_REVISION        branch, tag or commit (default: main)
#   VLLM_ARGS             extra `vllm serve` arguments, split on whitespace (no shell quoting inside)
#   SIMSWARM_ENGINE       auto | native | python | s5cmd
#   SIMSWARM_VERIFY       full | size
#   SIMSWARM_FILES        vllm (default: only what vLLM reads) | all (the whole snapshot)
#   SIMSWARM_NO_FALLBACK  true: never download from the Hugging Face Hub
#   SIMSWARM_WRITE_BACK   true: stage a model that came from the Hub into the bucket for the next pod
#   SIMSWARM_REPORT       file to write the pull's JSON report to
#   SIMSWARM_OVERLAP      false: pull every file before vLLM starts (read by the agent itself; default:
#                         vLLM starts once its configs are in place, the weights arriving meanwhile)
# Arguments given to this script go to vLLM after VLLM_ARGS. MINIO_*, HF_HOME, HF_TOKEN, HF_ENDPOINT
# are read by the agent itself (never put a credential on a command line).
set -euo pipefail

is_true() {
    case "${1,,}" in
        1 | true | yes | on) return 0 ;;
        *) return 1 ;;
    esac
}

if [[ -z "${MODEL_ID:-}" ]]; then
    echo "error: MODEL_ID is not set (set it to the Hugging Face repo id to serve, e.g. MODEL_ID=Qwen/Qwen3-14B)" >&2
    exit 2
fi

args=(serve "$MODEL_ID")
if [[ -n "${MODEL_REVISION:-}" ]]; then args+=(--revision "$MODEL_REVISION"); fi
if [[ -n "${SIMSWARM_ENGINE:-}" ]]; then args+=(--engine "$SIMSWARM_ENGINE"); fi
if [[ -n "${SIMSWARM_VERIFY:-}" ]]; then args+=(--verify "$SIMSWARM_VERIFY"); fi
if [[ -n "${SIMSWARM_FILES:-}" ]]; then args+=(--files "$SIMSWARM_FILES"); fi
if [[ -n "${SIMSWARM_REPORT:-}" ]]; then args+=(--report "$SIMSWARM_REPORT"); fi
if is_true "${SIMSWARM_NO_FALLBACK:-}"; then args+=(--no-fallback); fi
if is_true "${SIMSWARM_WRITE_BACK:-}"; then args+=(--write-back); fi

# `read -a` splits on whitespace without glob expansion, so `*` in VLLM_ARGS stays a `*`.
vllm_args=()
if [[ -n "${VLLM_ARGS:-}" ]]; then read -r -a vllm_args <<<"$VLLM_ARGS"; fi

exec simswarm-agent "${args[@]}" -- "${vllm_args[@]}" "$@"
