"""Repository shapes that carry weights vLLM never reads, built on the tiny Llama of `model.py`.

- `llama3`: HF safetensors shards + index, and Meta's `original/` folder (`consolidated.00.pth`,
  `params.json`, a tiktoken-format `tokenizer.model`), as Llama 3.x repos ship it;
- `bin-and-safetensors`: the same model also as `pytorch_model-*.bin` shards with their index;
- `mistral`: Mistral's own format (`consolidated.safetensors` with Mistral tensor names, `params.json`,
  `tekken.json`) beside HF `model-*.safetensors`, index and `config.json`, as Mistral repos ship it;
- `bin-only`: `pytorch_model-*.bin` shards + index and a `training_args.bin`, no safetensors.

`.bin` and `.pth` files are written with `torch.save` when torch is importable (the vLLM check runs in
a venv with torch and loads them). Without torch they hold the same tensors as a NumPy `.npz`: the
agent only moves bytes, so the pull tests need their names and sizes, not a loadable pickle.
"""

from __future__ import annotations

import base64
import importlib
import json
import shutil
from pathlib import Path
from typing import Any

from agent.demo.model import VOCAB_SIZE, generate_model

SHAPES = ("llama3", "bin-and-safetensors", "mistral", "bin-only")
BIN_INDEX = "pytorch_model.bin.index.json"
ST_INDEX = "model.safetensors.index.json"
MISTRAL_NAMES = {  # HF Llama name part -> Mistral/Meta consolidated name part
    "model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output",
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm", "model.layers": "layers",
}
SPECIAL_TOKENS = 20  # mistral_common's v7 default set


def _load(path: Path) -> dict[str, Any]:
    from safetensors.numpy import load_file

    return dict(load_file(str(path)))


def save_pickled(tensors: dict[str, Any], path: Path) -> None:
    """torch.save of the tensors (what vLLM's pt_weights_iterator loads), else a NumPy archive."""
    try:
        torch = importlib.import_module("torch")  # optional: only the vLLM check's venv has it
    except ImportError:
        import numpy

        with path.open("wb") as fh:
            numpy.savez(fh, **tensors)
        return
    torch.save({name: torch.from_numpy(array.copy()) for name, array in tensors.items()}, path)


def mistral_name(hf_name: str) -> str:
    name = hf_name
    for hf, mistral in MISTRAL_NAMES.items():
        name = name.replace(hf, mistral)
    return name


def _shards(dest: Path) -> list[str]:
    return sorted(json.loads((dest / ST_INDEX).read_text())["weight_map"].values())


def _all_tensors(dest: Path) -> dict[str, Any]:
    tensors: dict[str, Any] = {}
    for shard in sorted(set(_shards(dest))):
        tensors.update(_load(dest / shard))
    return tensors


def _write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def add_bin_shards(dest: Path) -> list[str]:
    """pytorch_model-*.bin shards holding the same tensors as the safetensors shards, with an index."""
    weight_map: dict[str, str] = {}
    shards = sorted(set(_shards(dest)))
    names = []
    for index, shard in enumerate(shards):
        tensors = _load(dest / shard)
        name = f"pytorch_model-{index + 1:05d}-of-{len(shards):05d}.bin"
        save_pickled(tensors, dest / name)
        weight_map.update(dict.fromkeys(tensors, name))
        names.append(name)
    total = sum(a.nbytes for s in shards for a in _load(dest / s).values())
    _write_json(dest / BIN_INDEX, {"metadata": {"total_size": total},
                                   "weight_map": dict(sorted(weight_map.items()))})
    return names


def _tiktoken_bytes() -> str:
    """The byte-level vocabulary in tiktoken's file format (`base64 rank` per line), as Llama 3's
    original/tokenizer.model holds it."""
    return "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))


def _tekken() -> dict[str, Any]:
    """A tekken.json (mistral_common's tokenizer file, version v7) over single bytes, sized so the
    tokenizer's vocabulary matches the model's."""
    vocab = [{"rank": b, "token_bytes": base64.b64encode(bytes([b])).decode(), "token_str": chr(b)}
             for b in range(256)]
    config = {"pattern": r"\s+|\S+", "num_vocab_tokens": len(vocab), "default_vocab_size": VOCAB_SIZE,
              "default_num_special_tokens": SPECIAL_TOKENS, "version": "v7"}
    return {"config": config, "vocab": vocab}


def _mistral_params(config: dict[str, Any]) -> dict[str, Any]:
    """params.json in Mistral's format, with the keys vLLM's adapt_config_dict maps."""
    return {"dim": config["hidden_size"], "n_layers": config["num_hidden_layers"],
            "head_dim": config["head_dim"], "hidden_dim": config["intermediate_size"],
            "n_heads": config["num_attention_heads"], "n_kv_heads": config["num_key_value_heads"],
            "norm_eps": config["rms_norm_eps"], "vocab_size": config["vocab_size"],
            "rope_theta": config["rope_theta"], "max_position_embeddings": config["max_position_embeddings"]}


def _meta_original(dest: Path) -> None:
    tensors = {mistral_name(n): a for n, a in _all_tensors(dest).items()}
    save_pickled(tensors, dest / "original" / "consolidated.00.pth")
    (dest / "original" / "tokenizer.model").write_text(_tiktoken_bytes(), encoding="utf-8")


def _mistral(dest: Path) -> None:
    from safetensors.numpy import save_file

    tensors = {mistral_name(n): a for n, a in _all_tensors(dest).items()}
    save_file(tensors, str(dest / "consolidated.safetensors"))
    config = json.loads((dest / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
    _write_json(dest / "config.json", config)
    _write_json(dest / "params.json", _mistral_params(config))
    _write_json(dest / "tekken.json", _tekken())
    shutil.rmtree(dest / "original")  # Mistral repos have no Meta original/ folder


def _bin_only(dest: Path) -> None:
    add_bin_shards(dest)
    for shard in sorted(set(_shards(dest))):
        (dest / shard).unlink()
    (dest / ST_INDEX).unlink()
    save_pickled({"learning_rate": _scalar(3e-4)}, dest / "training_args.bin")


def _scalar(value: float) -> Any:
    import numpy

    return numpy.array([value], dtype=numpy.float32)


def generate_shape(dest: Path, shape: str, *, shards: int = 2, shard_bytes: int = 128 * 1024,
                   seed: int = 0) -> dict[str, Path]:
    """Write one repository shape into `dest`; returns {relative path: file path} of every file."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}")
    dest = Path(dest)
    generate_model(dest, shards=shards, shard_bytes=shard_bytes, seed=seed)
    if shape == "llama3":
        _meta_original(dest)
    elif shape == "mistral":
        _mistral(dest)
    else:  # the two .bin shapes: no Meta original/ folder, one thing at a time
        shutil.rmtree(dest / "original")
        if shape == "bin-and-safetensors":
            add_bin_shards(dest)
        else:
            _bin_only(dest)
    files = sorted(p for p in dest.rglob("*") if p.is_file())
    return {p.relative_to(dest).as_posix(): p for p in files}

