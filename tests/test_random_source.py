"""random: model sources: the architecture and shape of a config.json with seeded random weights,
and a tokenizer folder beside them (config keys model.source, model.tokenizer, model.seed).

Real fetches of a tiny Qwen2-shaped model, the shipped Qwen2.5-0.5B shape built on the meta device,
and the fetch_model rule run by Snakemake.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import REPO, snakemake, tiny_config
from loragrid.common import checksums, read_json, sha256_file
from loragrid.fetch import fetch_model

TINY = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 640,
    "max_position_embeddings": 512, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 2,
}


def tiny_parameters(c: dict) -> int:
    """Qwen2's parameter count, term by term: q/k/v have a bias, o and the MLP have none."""
    hidden, vocab, head = c["hidden_size"], c["vocab_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head
    attention = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden
    layer = attention + 3 * hidden * c["intermediate_size"] + 2 * hidden
    heads = 1 if c["tie_word_embeddings"] else 2
    return heads * vocab * hidden + c["num_hidden_layers"] * layer + hidden


def write_config(path: Path, **changes) -> Path:
    path.write_text(json.dumps({**TINY, **changes}, indent=1))
    return path


def test_a_random_source_has_the_shape_and_the_seeded_weights(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = write_config(tmp_path / "tiny-qwen.json")  # not named config.json
    provenance = fetch_model(f"random:{config}", tmp_path / "a", tokenizer=str(tiny_model_dir), seed=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.bfloat16  # the default dtype
    assert model.num_parameters() == tiny_parameters(TINY) == provenance["parameters"]
    assert model.model.layers[0].self_attn.q_proj.bias is not None and len(model.model.layers) == 2
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")

    recorded = read_json(tmp_path / "a" / "source.json")
    assert recorded["random_init"] is True and recorded["seed"] == 0 and recorded["tokenizer"] == str(tiny_model_dir)
    assert recorded["source_sha256"] == sha256_file(config) and recorded["tokenizer_sha256"]
    assert recorded["files"] == {k: v for k, v in checksums(tmp_path / "a").items() if k != "source.json"}

    fetch_model(f"random:{config}", tmp_path / "b", tokenizer=str(tiny_model_dir), seed=0)
    fetch_model(f"random:{config}", tmp_path / "c", tokenizer=str(tiny_model_dir), seed=1)
    weights = {name: sha256_file(tmp_path / name / "model.safetensors") for name in "abc"}
    assert weights["a"] == weights["b"] != weights["c"]


def test_a_changed_config_tokenizer_or_seed_fetches_again(tmp_path, tiny_model_dir, caplog):
    config = write_config(tmp_path / "tiny-qwen.json", torch_dtype="float32")
    tokenizer = tmp_path / "tokenizer"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / name).exists():
            (tokenizer / name).parent.mkdir(exist_ok=True)
            shutil.copy(tiny_model_dir / name, tokenizer / name)
    out = tmp_path / "model"

    def fetch(seed=0):
        caplog.clear()
        return fetch_model(f"random:{config}", out, tokenizer=str(tokenizer), seed=seed)

    caplog.set_level("INFO")
    fetch()
    assert read_json(out / "config.json")["dtype"] == "float32"
    fetch()
    assert "nothing to fetch" in caplog.text

    write_config(config, torch_dtype="float32", num_hidden_layers=3)
    fetch()
    assert "nothing to fetch" not in caplog.text and read_json(out / "config.json")["num_hidden_layers"] == 3

    settings = read_json(tokenizer / "tokenizer_config.json")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 256}))
    fetch()
    assert ("nothing to fetch" not in caplog.text
            and read_json(out / "tokenizer_config.json")["model_max_length"] == 256)

    fetch(seed=5)
    assert "nothing to fetch" not in caplog.text and read_json(out / "source.json")["seed"] == 5


def test_the_shipped_qwen2_5_0_5b_shape():
    """config/models/qwen2.5-0.5b.json is Qwen2.5-0.5B-Instruct's shape: 494,032,768 parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from loragrid.config import read_random_config

    settings = read_random_config(REPO / "config" / "models" / "qwen2.5-0.5b.json")
    assert settings.pop("torch_dtype") == "bfloat16"
    config = AutoConfig.for_model(**settings)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters()) == 494_032_768
    assert model.model.layers[0].self_attn.k_proj.bias.shape == (128,)  # 2 key/value heads of 64

    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "tokenizers" / "smollm2")
    assert config.bos_token_id == tokenizer.convert_tokens_to_ids("<|im_start|>") == tokenizer.bos_token_id
    assert config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id and len(tokenizer) <= config.vocab_size


def test_the_fetch_model_rule_builds_a_random_source(copy_repo, tiny_model_dir):
    """The rule passes tokenizer and seed on; a new seed or an edited tokenizer file re-runs it, nothing else does."""
    write_config(copy_repo / "config" / "models" / "tiny-qwen.json")
    tokenizer = shutil.copytree(tiny_model_dir, copy_repo / "tokenizer",
                                ignore=shutil.ignore_patterns("*.safetensors"))
    model = {"name": "tiny-random", "source": "random:config/models/tiny-qwen.json", "tokenizer": "tokenizer",
             "seed": 3}
    config = tiny_config(copy_repo, tiny_model_dir, model=model)
    result = snakemake(copy_repo, "resources/models/tiny-random", "--configfile", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    recorded = read_json(copy_repo / "resources" / "models" / "tiny-random" / "source.json")
    assert (recorded["random_init"] is True and recorded["seed"] == 3
            and recorded["parameters"] == tiny_parameters(TINY))

    unchanged = snakemake(copy_repo, "-n", "resources/models/tiny-random", "--configfile", str(config))
    assert unchanged.returncode == 0 and "Nothing to be done" in unchanged.stdout + unchanged.stderr
    reseeded = tiny_config(copy_repo, tiny_model_dir, model={**model, "seed": 4})
    result = snakemake(copy_repo, "-n", "resources/models/tiny-random", "--configfile", str(reseeded))
    assert result.returncode == 0 and "reason: Params have changed" in result.stdout + result.stderr

    tiny_config(copy_repo, tiny_model_dir, model=model)
    with open(tokenizer / "tokenizer_config.json", "a", encoding="utf-8") as handle:
        handle.write("\n")  # edited in place: the folder's own mtime stays as it was
    result = snakemake(copy_repo, "-n", "resources/models/tiny-random", "--configfile", str(config))
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "reason: Updated input files: tokenizer/tokenizer_config.json" in output



def train_lora_on(copy_repo, tiny_model_dir, name: str, shape: dict) -> tuple[dict, str]:
    """(train.json, training log) of a LoRA run through snakemake on a random model of this config.json."""
    (copy_repo / f"{name}.json").write_text(json.dumps(shape))
    model = {"name": name, "source": f"random:{name}.json", "tokenizer": str(tiny_model_dir)}
    config = tiny_config(copy_repo, tiny_model_dir, model=model, grid={"method": ["lora"]})
    result = snakemake(copy_repo, f"results/{name}--tiny/runs/lora/train.json", "--configfile", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return (read_json(copy_repo / f"results/{name}--tiny/runs/lora/train.json"),
            (copy_repo / f"logs/{name}--tiny/train/lora.log").read_text())


def test_training_an_architecture_the_estimate_was_not_checked_for_says_so_in_its_log(copy_repo, tiny_model_dir):
    """Mixtral's experts are not in the memory estimate's terms (docs/memory.md): its training job's log warns."""
    mixtral = {**TINY, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 2,
               "num_experts_per_tok": 1}
    train, log = train_lora_on(copy_repo, tiny_model_dir, "tiny-mixtral", mixtral)
    assert "the memory estimate was checked against measurement for model types llama" in log
    assert "not for 'mixtral': it may be low" in log and train["memory_estimate"] is not None


def test_an_architecture_without_an_estimate_trains_and_reports_its_measured_memory(copy_repo, tiny_model_dir):
    """GPT-2's config.json names its shape n_embd, n_layer, n_head: no estimate, and (before 2026-12-07) a KeyError
    in the job's memory request and in training. Snakemake sizes the job from the weights' safetensors headers."""
    from loragrid.report import _memory_columns, plot_memory

    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4,
            "vocab_size": 640, "n_positions": 512, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    train, log = train_lora_on(copy_repo, tiny_model_dir, "tiny-gpt2", gpt2)
    assert "no memory estimate for model type 'gpt2'" in log and "lacks hidden_size" in log
    assert train["memory_estimate"] is None and train["memory"]["training_peak_bytes"] > 0
    columns = _memory_columns(train)  # the report's table: "–" for the NaN estimate
    assert columns["training_memory_gb"] > 0 and columns["estimated_memory_gb"] != columns["estimated_memory_gb"]
    plot_memory({"lora": train}, copy_repo / "memory.png")  # measured bars only
    assert (copy_repo / "memory.png").stat().st_size > 0

    # max_memory_gb picks the micro-batch from the estimate: refused for this model, before the first step.
    target = "results/tiny-gpt2--tiny/runs/lora/train.json"
    result = snakemake(copy_repo, target, "--configfile", "tiny.yaml", "--config", "training={max_memory_gb: 8}")
    log = (copy_repo / "logs/tiny-gpt2--tiny/train/lora.log").read_text()
    assert result.returncode != 0 and not (copy_repo / target).exists()
    # Named as the user wrote it (before 2026-12-07 a job's errors named the bare setting, 'max_memory_gb').
    assert ("config key 'training.max_memory_gb' (run lora) picks the micro-batch from the memory estimate: "
            "no memory estimate" in log)

