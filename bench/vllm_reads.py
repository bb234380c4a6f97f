"""What vLLM's own code reads from an offline cache: run with the Python of a venv that has vLLM.

    HF_HUB_OFFLINE=1 HF_HUB_CACHE=DIR python bench/vllm_reads.py ORG/NAME [ORG/NAME ...]

For each model id, the steps `vllm serve` takes before it needs a GPU, on CPU:
1. `EngineArgs(model=ID)`: offline, vLLM resolves the id to the local snapshot
   (`get_model_path`, which is `snapshot_download(local_files_only=True)`), then
   `create_model_config()` builds the `ModelConfig` (config format detected from the files present);
2. its tokenizer, through `vllm.tokenizers.registry.get_tokenizer` with the config's tokenizer mode;
3. `DefaultModelLoader(LoadConfig(load_format="auto"))._prepare_weights(...)`, the weight-file
   choice, then every tensor through vLLM's own safetensors or pt iterator.
Also, as a second opinion, `ModelConfig(model=ID)` and `_prepare_weights(ID, ...)` with the bare id
(what TESTING.md lists), which offline cannot list the repo's files.

Files opened through Python while doing so are recorded with an audit hook (safetensors and
tokenizers open theirs in Rust, so the weight list comes from `_prepare_weights` itself). One JSON
object per model goes to stdout.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

OPENED: set[str] = set()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and isinstance(args[0], (str, Path)):
        OPENED.add(os.path.abspath(str(args[0])))


def _weights(files: list[str], use_safetensors: bool) -> tuple[int, int]:
    from vllm.model_executor.model_loader import weight_utils

    iterator = (weight_utils.safetensors_weights_iterator(files, False) if use_safetensors
                else weight_utils.pt_weights_iterator(files, False))
    count = nbytes = 0
    for _name, tensor in iterator:
        count += 1
        nbytes += tensor.numel() * tensor.element_size()
    return count, nbytes


def serve_path(model_id: str) -> dict[str, Any]:
    """The path `vllm serve` takes: EngineArgs resolves the id to the snapshot first."""
    from vllm.config import LoadConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.tokenizers.registry import get_tokenizer

    OPENED.clear()
    engine_args = EngineArgs(model=model_id, served_model_name=model_id)
    config = engine_args.create_model_config()
    tokenizer = get_tokenizer(config.tokenizer, tokenizer_mode=config.tokenizer_mode,
                              revision=config.tokenizer_revision, trust_remote_code=False)
    ids = tokenizer.encode("hello world")
    loader = DefaultModelLoader(LoadConfig(load_format="auto"))
    folder, files, use_st, index = loader._prepare_weights(config.model, None, config.revision, True, None)
    count, nbytes = _weights(files, use_st)
    snapshot = Path(folder).resolve()
    opened = sorted(os.path.relpath(p, folder) for p in OPENED if p.startswith(str(Path(folder))))
    return {"snapshot": str(snapshot), "model": config.model, "architectures": config.architectures,
            "config_format": config.config_format, "tokenizer_mode": config.tokenizer_mode,
            "tokenizer": type(tokenizer).__name__, "tokens": len(ids), "use_safetensors": use_st,
            "index": index, "weight_files": sorted(os.path.relpath(f, folder) for f in files),
            "tensors": count, "tensor_bytes": nbytes, "opened_by_python": opened}


def bare_id(model_id: str) -> dict[str, Any]:
    """TESTING.md's calls with the bare id, no path resolution first."""
    from vllm.config import LoadConfig, ModelConfig
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    try:
        config = ModelConfig(model=model_id, tokenizer=model_id)
        loader = DefaultModelLoader(LoadConfig(load_format="auto"))
        folder, files, use_st, _ = loader._prepare_weights(model_id, None, None, True, None)
        count, _ = _weights(files, use_st)
        return {"ok": True, "architectures": config.architectures,
                "weight_files": sorted(os.path.relpath(f, folder) for f in files), "tensors": count}
    except Exception as exc:  # reported, not hidden: the caller decides what it means
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def main(model_ids: list[str]) -> int:
    import vllm

    sys.addaudithook(_audit)
    failed = False
    for model_id in model_ids:
        row: dict[str, Any] = {"model": model_id, "vllm": vllm.__version__}
        try:
            row["serve_path"] = serve_path(model_id)
        except Exception as exc:
            failed = True
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc()[-3000:]
        row["bare_id"] = bare_id(model_id)
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
