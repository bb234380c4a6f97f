"""A small real Llama checkpoint that vLLM's CPU build serves: written by transformers' `save_pretrained`,
with a byte-level BPE tokenizer trained by `tokenizers`. Run with the Python of vLLM's venv (it has
torch and transformers; the agent's own interpreter need not):

    VLLM_PYTHON tests/support/vllm_model.py DEST [--hidden 512] [--layers 2] [--shards 2]

head_dim is always 64: vLLM's CPU attention kernels refuse smaller heads (16 is "Unsupported CPU
attention configuration"). Weights are seeded, so the same arguments write the same bytes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HEAD_DIM = 64
CORPUS = ["The quick brown fox jumps over the lazy dog.", "SimSwarm serves models with vLLM on GPU pods.",
          "Weights are staged in MinIO and pulled by the agent.", "hello world, hello pods, hello weights"]


def write_tokenizer(dest: Path, vocab_size: int) -> None:
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(CORPUS * 8, vocab_size=vocab_size, min_frequency=1,
                                  special_tokens=["<s>", "</s>", "<unk>"])
    tokenizer.save(str(dest / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 2048, "clean_up_tokenization_spaces": False}
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (dest / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))


def write_model(dest: Path, hidden: int, layers: int, shards: int, vocab_size: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=hidden // HEAD_DIM,
                         num_key_value_heads=hidden // HEAD_DIM, head_dim=HEAD_DIM,
                         max_position_embeddings=2048, bos_token_id=0, eos_token_id=1,
                         torch_dtype="bfloat16", tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    shard_size = max(1, total // shards + 1)
    model.save_pretrained(dest, max_shard_size=shard_size, safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    write_tokenizer(args.dest, args.vocab)
    write_model(args.dest, args.hidden, args.layers, args.shards, args.vocab)


if __name__ == "__main__":
    main()
