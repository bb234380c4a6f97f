"""A small but real Llama-style model repository, generated on the spot.

The agent moves bytes it never interprets, yet the test model has to be real where a consumer looks:
safetensors headers that `safe_open` parses, an index whose weight_map matches the shards, a config
and tokenizer that transformers would accept, a dotfile and a nested file (`original/params.json`,
whose snapshot link needs one more `../`). Tensor sizes follow `shard_bytes`, so the same generator
serves unit tests (KiB) and benchmarks (GiB); the shapes always agree with config.json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VOCAB_SIZE = 256
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, as in Llama
DTYPES = {"float32": 4, "float16": 2}
TRANSFORMERS_VERSION = "4.46.0"
INIT_STD = 0.02
GITATTRIBUTES = (
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    "*.bin filter=lfs diff=lfs merge=lfs -text\n"
)


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions that fix every tensor shape of a Llama decoder."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = VOCAB_SIZE

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(name, shape) in the order transformers saves them: embeddings, layers, final norm, head."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        yield "model.embed_tokens.weight", (self.vocab, h)
        for i in range(self.layers):
            p = f"model.layers.{i}"
            yield f"{p}.self_attn.q_proj.weight", (h, h)
            yield f"{p}.self_attn.k_proj.weight", (kv, h)
            yield f"{p}.self_attn.v_proj.weight", (kv, h)
            yield f"{p}.self_attn.o_proj.weight", (h, h)
            yield f"{p}.mlp.gate_proj.weight", (self.intermediate, h)
            yield f"{p}.mlp.up_proj.weight", (self.intermediate, h)
            yield f"{p}.mlp.down_proj.weight", (h, self.intermediate)
            yield f"{p}.input_layernorm.weight", (h,)
            yield f"{p}.post_attention_layernorm.weight", (h,)
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (self.vocab, h)  # tie_word_embeddings is false: the head is its own tensor


def _heads_for(hidden: int) -> tuple[int, int]:
    head_dim = min(128, max(16, hidden // 16))
    heads = max(1, hidden // head_dim)
    return heads, max(1, heads // 2)  # grouped-query attention, as current Llamas use


def _fixed_params(hidden: int) -> int:
    return 2 * VOCAB_SIZE * hidden + hidden  # embeddings, head, final norm


def _attention_params(hidden: int) -> int:
    heads, kv_heads = _heads_for(hidden)
    kv = kv_heads * (hidden // heads)
    return 2 * hidden * hidden + 2 * hidden * kv + 2 * hidden  # q, o, k, v, two norms


def choose_shape(target_params: int, shards: int) -> LlamaShape:
    """A Llama whose parameter count is close to `target_params`: two layers per shard, the widest
    power-of-two hidden size that leaves the MLP at least half as wide, the MLP width taking up the rest."""
    layers = 2 * shards
    hidden = 16
    while True:
        wider = hidden * 2
        smallest_mlp = 3 * wider * wider // 2
        if _fixed_params(wider) + layers * (_attention_params(wider) + smallest_mlp) > target_params:
            break
        hidden = wider
    per_layer = (target_params - _fixed_params(hidden)) / layers - _attention_params(hidden)
    intermediate = max(8, 8 * round(per_layer / (3 * hidden) / 8))
    heads, kv_heads = _heads_for(hidden)
    return LlamaShape(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, kv_heads=kv_heads)


def split_into_shards(sizes: list[tuple[str, int]], shards: int) -> list[list[str]]:
    """Consecutive groups of tensor names with about equal bytes each; no group is empty."""
    total = sum(size for _, size in sizes)
    groups: list[list[str]] = [[] for _ in range(shards)]
    shard, done = 0, 0
    for index, (name, size) in enumerate(sizes):
        left = len(sizes) - index
        behind = done >= (shard + 1) * total / shards
        if groups[shard] and shard < shards - 1 and (behind or left <= shards - 1 - shard):
            shard += 1
        groups[shard].append(name)
        done += size
    return groups


def shard_name(index: int, shards: int) -> str:
    return f"model-{index + 1:05d}-of-{shards:05d}.safetensors"


def _config(shape: LlamaShape, dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": INIT_STD,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": 512,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": shape.vocab,
    }


def _meta_params(shape: LlamaShape) -> dict[str, Any]:
    """Meta's original-checkpoint params.json, as Llama repos carry under original/."""
    return {
        "dim": shape.hidden,
        "n_layers": shape.layers,
        "n_heads": shape.heads,
        "n_kv_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "ffn_dim_multiplier": None,
        "multiple_of": 8,
        "norm_eps": 1e-06,
        "rope_theta": 10000.0,
    }


def _vocab() -> dict[str, int]:
    """Specials, then the printable ASCII characters, then numbered filler words up to VOCAB_SIZE."""
    words = list(SPECIAL_TOKENS) + [chr(c) for c in range(33, 127)]
    words += [f"w{i}" for i in range(VOCAB_SIZE - len(words))]
    return {word: i for i, word in enumerate(words)}


def _tokenizer() -> dict[str, Any]:
    """A `tokenizers` JSON (WordLevel + whitespace split) that `Tokenizer.from_str` loads."""
    added = [
        {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, token in enumerate(SPECIAL_TOKENS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": _vocab(), "unk_token": "<unk>"},
    }


def _tokenizer_config() -> dict[str, Any]:
    decoder = {
        str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, token in enumerate(SPECIAL_TOKENS)
    }
    return {
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _import_arrays() -> tuple[Any, Any]:
    try:
        import numpy
        from safetensors.numpy import save_file
    except ImportError as exc:  # an optional extra: say which one
        raise ImportError(
            "generating a test model needs numpy and safetensors: pip install 'simswarm-agent[demo]'"
        ) from exc
    return numpy, save_file


def _write_shards(dest: Path, shape: LlamaShape, shards: int, dtype: str, seed: int) -> dict[str, str]:
    """Write the safetensors shards; returns the weight_map (tensor name -> shard file name)."""
    numpy, save_file = _import_arrays()
    shapes = dict(shape.tensors())
    sizes = [(name, math.prod(dims) * DTYPES[dtype]) for name, dims in shapes.items()]
    rng = numpy.random.default_rng(seed)
    weight_map: dict[str, str] = {}
    for index, names in enumerate(split_into_shards(sizes, shards)):
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                array = numpy.ones(shapes[name], dtype=numpy.float32)  # RMSNorm starts at identity
            else:
                array = rng.standard_normal(shapes[name], dtype=numpy.float32)
                array *= INIT_STD
            tensors[name] = array.astype(dtype, copy=False)
        filename = shard_name(index, shards)
        # "format": "pt" is what transformers checks before it loads a safetensors checkpoint.
        save_file(tensors, str(dest / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
    return weight_map


def generate_model(dest: Path, *, shards: int = 2, shard_bytes: int = 256 * 1024, seed: int = 0,
                   dtype: str = "float32") -> dict[str, Path]:
    """Write a tiny Llama repository into `dest`; returns {relative path ("/"-separated): file path}.

    Deterministic for a given (shards, shard_bytes, seed, dtype). Each shard holds about `shard_bytes`
    of tensors (never less than a 16-wide model needs).
    """
    if shards < 1 or shard_bytes < 1:
        raise ValueError("shards and shard_bytes must be positive")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shape = choose_shape(shards * shard_bytes // DTYPES[dtype], shards)
    weight_map = _write_shards(dest, shape, shards, dtype, seed)
    total_size = sum(math.prod(dims) * DTYPES[dtype] for _, dims in shape.tensors())

    documents: dict[str, Any] = {
        "config.json": _config(shape, dtype),
        "generation_config.json": {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                                   "transformers_version": TRANSFORMERS_VERSION},
        "tokenizer.json": _tokenizer(),
        "tokenizer_config.json": _tokenizer_config(),
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        "model.safetensors.index.json": {"metadata": {"total_size": total_size},
                                         "weight_map": dict(sorted(weight_map.items()))},
        "original/params.json": _meta_params(shape),
    }
    for relpath, document in documents.items():
        _write_json(dest / relpath, document)
    (dest / ".gitattributes").write_text(GITATTRIBUTES, encoding="utf-8")

    relpaths = [*documents, ".gitattributes", *sorted(set(weight_map.values()))]
    return {relpath: dest / relpath for relpath in sorted(relpaths)}
