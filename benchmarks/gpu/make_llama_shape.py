"""Write a model folder with Llama-3.1-8B's shape and no weights, for `--load-format dummy`.

    python benchmarks/gpu/make_llama_shape.py --tokenizer-from SMOLLM2_DIR --output DIR

config.json is Llama-3.1-8B's (32 layers, hidden 4096, MLP 14336, 32 query and 8 KV heads of 128, llama3
RoPE scaling) except the vocabulary: no Llama tokenizer is at hand offline, so the folder takes
SmolLM2's tokenizer and vocab_size 49152 to match it (Llama's is 128256). The embedding and LM head
are then ~0.4 GB instead of ~1 GB each: the 32 decoder layers, ~93% of Llama-3.1-8B's compute per token,
are unchanged. vLLM fills the weights with random values, so the text is noise; lengths are exact
because the load client sends token ids with ignore_eos.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
    "use_cache": True,
    "initializer_range": 0.02,
    "pretraining_tp": 1,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-from", type=Path, required=True, help="the SmolLM2 model folder")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    source = json.loads((args.tokenizer_from / "config.json").read_text())
    config = {**CONFIG, "vocab_size": source["vocab_size"], "bos_token_id": source.get("bos_token_id"),
              "eos_token_id": source.get("eos_token_id"), "pad_token_id": source.get("pad_token_id")}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (args.tokenizer_from / name).exists():
            shutil.copy2(args.tokenizer_from / name, args.output / name)
    print(f"wrote {args.output} (Llama-3.1-8B shape, vocab {config['vocab_size']}, no weights)")


if __name__ == "__main__":
    main()
