"""How close the memory estimate comes to the measurement, per architecture (docs/memory.md).

For each model type, a small decoder with random weights (hidden 256, 4 layers, 4 heads, GQA, through the
random: source) trains two steps of each method in this process, as tests/test_memory.py trains its Qwen
shapes: micro-batch 4, accumulation 2, cutoff 128, LoRA r=16 on every linear layer. Prints the estimate at
the measured step over the measurement (tensor accounting), and the parameters counted from config.json
over the loaded model's. Memory is counted, not timed: any machine load will do.

    python bench/estimate_architectures.py [--types llama qwen3 gemma2] [--methods full lora]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

BASE = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 1024,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
# Qwen3's heads are wider than hidden_size / heads here (4 x 128 over 256), as in Qwen3-0.6B.
SHAPES = {
    "llama": {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False},
    "mistral": {"architectures": ["MistralForCausalLM"]},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "head_dim": 128, "tie_word_embeddings": True},
    "gemma": {"architectures": ["GemmaForCausalLM"], "head_dim": 64},
    "phi3": {"architectures": ["Phi3ForCausalLM"]},
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], "head_dim": 64},
    "gemma3_text": {"architectures": ["Gemma3ForCausalLM"], "head_dim": 64},
    "olmo2": {"architectures": ["Olmo2ForCausalLM"]},
    "granite": {"architectures": ["GraniteForCausalLM"]},
    # Not checked: experts (4 here, 2 per token) are beyond the estimate's terms.
    "mixtral": {"architectures": ["MixtralForCausalLM"], "num_local_experts": 4, "num_experts_per_tok": 2},
}
METHODS = ("full", "lora", "qlora4", "qlora8")


def build(model_type: str, folder: Path, tokenizer: Path) -> Path:
    from loragrid.fetch import fetch_model

    shape = {**BASE, "model_type": model_type, **SHAPES[model_type]}
    (folder / "shape.json").write_text(json.dumps(shape))
    fetch_model(f"random:{folder / 'shape.json'}", folder / "model", tokenizer=str(tokenizer), seed=0)
    return folder / "model"


def ratios(model_dir: Path, data_dir: Path, method: str, out: Path) -> tuple[float, float]:
    """(estimate / measured training memory, config.json's parameters / the loaded model's) of one run."""
    from conftest import TINY_RUN
    from loragrid import estimate
    from loragrid.config import CHECKPOINTING_BY_METHOD
    from loragrid.train import train

    settings = {**TINY_RUN, "method": method, "max_steps": 2, "batch_size": 8, "micro_batch_size": 4,
                "lora_r": 16, "lora_alpha": 32, "gradient_checkpointing": CHECKPOINTING_BY_METHOD[method]}
    summary = train(model_dir, data_dir, out / method, settings, "chat")
    estimated = summary["memory_estimate"]["at_measured_step"]["total_bytes"]
    from_config = estimate.total_parameters(estimate.model_sizes(json.loads((model_dir / "config.json").read_text())))
    loaded = summary["parameters"]["total"] - (summary["parameters"]["trainable"] if method != "full" else 0)
    return estimated / summary["memory"]["training_peak_bytes"], from_config / loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()
    from conftest import build_tiny_model, demo_records, write_jsonl
    from loragrid.data import prepare
    from loragrid.estimate import CHECKED_MODEL_TYPES

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        tokenizer = build_tiny_model(scratch / "tokenizer")
        prepare(write_jsonl(scratch / "qa.jsonl", demo_records(60)), scratch / "data", heldout_min=10)
        print("model type | checked | parameters from config.json / loaded | " + " | ".join(args.methods))
        for model_type in args.types:
            folder = scratch / model_type
            folder.mkdir()
            model_dir = build(model_type, folder, tokenizer)
            results = [ratios(model_dir, scratch / "data", method, folder) for method in args.methods]
            cells = [model_type, "yes" if model_type in CHECKED_MODEL_TYPES else "no", f"{results[0][1]:.4f}",
                     *(f"{memory_ratio:.3f}" for memory_ratio, _ in results)]
            print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
