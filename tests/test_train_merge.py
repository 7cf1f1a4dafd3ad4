"""train and merge on the tiny model: every method, real Trainer, peft and bitsandbytes."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import TINY_RUN, write_jsonl
from loragrid.common import LoragridError, read_json, read_jsonl
from loragrid.merge import merge_to_files
from loragrid.templates import tokenize_example
from loragrid.tokenized import load_tokenizer
from loragrid.train import train_to_files


@pytest.fixture(scope="module")
def trained(tiny_model_dir, prepared_dir, tmp_path_factory):
    """Train each method once for the module; returns {method: (weights_dir, train.json content)}."""
    results = {}
    for method in ("full", "lora", "qlora4", "qlora8"):
        folder = tmp_path_factory.mktemp(method)
        settings = {**TINY_RUN, "method": method}
        results[method] = (folder / "weights", train_to_files(
            tiny_model_dir, prepared_dir, folder / "weights", folder / "train.json", settings, "chat"))
        assert read_json(folder / "train.json")["method"] == method
    return results


def total_parameters(model_dir):
    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


def test_train_summary(trained, tiny_model_dir):
    total = total_parameters(tiny_model_dir)
    for method, (_, summary) in trained.items():
        assert summary["steps"] == 3
        assert len(summary["loss_curve"]) == 3
        assert len(summary["step_seconds"]) == 3 and all(seconds > 0 for seconds in summary["step_seconds"])
        assert summary["tokens_seen_non_padding"] > 0 and summary["tokens_per_second"] > 0
        assert summary["memory"]["peak_rss_bytes"] > summary["memory"]["weights_bytes"] > 0
        assert summary["compute_dtype"] == "bfloat16"
        assert "torch" in summary["provenance"]["versions"]
        assert summary["provenance"]["settings"]["method"] == method
        assert set(summary["provenance"]["input_sha256"]) == {"model", "train_split", "dataset"}
        params = summary["parameters"]
        if method == "full":
            assert params["trainable"] == params["total"] == total
        else:
            # 4-bit weights are packed two to a byte; the count must still be the real one.
            lora = params["trainable"]
            assert params["total"] == total + lora, method
            assert 0 < lora < total


def test_quantized_weights_are_smaller(trained):
    weights = {method: summary["memory"]["weights_bytes"] for method, (_, summary) in trained.items()}
    assert weights["qlora4"] < weights["qlora8"] < weights["lora"] < weights["full"]


def test_adapter_loads_with_peft(trained, tiny_model_dir):
    adapter_dir, _ = trained["lora"]
    assert (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "adapter_model.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_full_model_saved_as_safetensors(trained):
    model_dir, _ = trained["full"]
    assert list(model_dir.glob("*.safetensors"))
    AutoModelForCausalLM.from_pretrained(model_dir)


def test_training_lowers_the_loss(tiny_model_dir, prepared_dir, tmp_path):
    settings = {**TINY_RUN, "max_steps": 12, "learning_rate": 3e-3}
    summary = train_to_files(tiny_model_dir, prepared_dir, tmp_path / "w", tmp_path / "t.json", settings, "chat")
    losses = [point["loss"] for point in summary["loss_curve"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_unknown_target_modules(tiny_model_dir, prepared_dir, tmp_path):
    settings = {**TINY_RUN, "target_modules": ["no_such_proj"]}
    with pytest.raises(LoragridError, match="target_modules"):
        train_to_files(tiny_model_dir, prepared_dir, tmp_path / "w", tmp_path / "t.json", settings, "chat")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("method", ["lora", "qlora4", "qlora8"])
def test_merge_matches_adapter_logits(trained, tiny_model_dir, prepared_dir, tmp_path, method):
    adapter_dir, _ = trained[method]
    summary = merge_to_files(tiny_model_dir, adapter_dir, tmp_path / "merged", tmp_path / "merge.json",
                             heldout_path=prepared_dir / "heldout.jsonl", template="chat", method=method)
    assert summary["max_relative_logit_difference"] <= 1e-3
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    if method != "lora":
        assert "relative_logit_difference_vs_quantized_training_model" in summary
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = any(not torch.equal(a, b) for a, b in zip(base.parameters(), merged.parameters()))
    assert changed


def test_merge_compares_against_the_quantization_the_run_trained_with(tiny_model_dir, prepared_dir, tmp_path):
    settings = {**TINY_RUN, "method": "qlora4", "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False}
    train_to_files(tiny_model_dir, prepared_dir, tmp_path / "adapter", tmp_path / "train.json", settings, "chat")
    summary = merge_to_files(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged", tmp_path / "merge.json",
                             heldout_path=prepared_dir / "heldout.jsonl", template="chat", method="qlora4",
                             quantization={k: v for k, v in settings.items() if k.startswith("bnb_4bit_")})
    assert summary["quantization_of_training_model"] == read_json(tmp_path / "train.json")["quantization"]
    assert summary["quantization_of_training_model"]["quant_type"] == "fp4"
    assert summary["quantization_of_training_model"]["double_quant"] is False


def test_qlora4_merges_a_model_narrower_than_the_packed_4bit_cpu_kernel_takes(tiny_model_dir, prepared_dir, tmp_path):
    """Hidden size 32: on a CPU with AVX512-BF16, bitsandbytes runs 4-bit inference through a packed kernel that
    takes in_features multiples of 64 only. Before 2026-12-08 such a run trained, then its merge (the check against
    the 4-bit model) and chat --load-in-4bit died inside bitsandbytes (RuntimeError: shape '[32, 0]'); those layers
    now take bitsandbytes' plain kernel, the one training uses."""
    from loragrid.chat import load_model
    from loragrid.fetch import fetch_model

    narrow = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 640}
    (tmp_path / "narrow.json").write_text(json.dumps(narrow))
    model_dir = tmp_path / "narrow"
    fetch_model(f"random:{tmp_path / 'narrow.json'}", model_dir, tokenizer=str(tiny_model_dir))
    settings = {**TINY_RUN, "method": "qlora4", "max_steps": 1}
    train_to_files(model_dir, prepared_dir, tmp_path / "adapter", tmp_path / "train.json", settings, "chat")
    summary = merge_to_files(model_dir, tmp_path / "adapter", tmp_path / "merged", tmp_path / "merge.json",
                             heldout_path=prepared_dir / "heldout.jsonl", template="chat", method="qlora4",
                             quantization={k: v for k, v in settings.items() if k.startswith("bnb_4bit_")})
    assert summary["relative_logit_difference_vs_quantized_training_model"] < 1
    model = load_model(model_dir, tmp_path / "adapter", load_in_4bit=True)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_merge_refuses_beyond_tolerance(trained, tiny_model_dir, prepared_dir, tmp_path):
    adapter_dir, _ = trained["lora"]
    with pytest.raises(LoragridError, match="tolerance"):
        merge_to_files(tiny_model_dir, adapter_dir, tmp_path / "merged", tmp_path / "merge.json",
                       heldout_path=prepared_dir / "heldout.jsonl", template="chat", method="lora",
                       tolerance=1e-12)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merge.json").exists()


def test_merge_checks_conversations_whose_answer_lies_beyond_the_cut(trained, tiny_model_dir, prepared_dir, tmp_path):
    adapter_dir, _ = trained["lora"]
    # About 600 tokens of question: the first 512 hold no answer token, so tokenize_example returns None.
    long_question = {"id": "h.jsonl, line 1", "messages": [{"role": "user", "content": "Why? " * 200},
                                                          {"role": "assistant", "content": "Because"}]}
    normal = read_jsonl(prepared_dir / "heldout.jsonl")[:3]
    tokenizer = load_tokenizer(adapter_dir)
    normal_tokens = sum(len(tokenize_example(tokenizer, "chat", r["messages"], cutoff_len=512)["input_ids"])
                        for r in normal)
    for records, prompts, tokens in (([long_question, *normal], 4, 512 + normal_tokens),
                                     ([long_question, long_question], 2, 1024)):
        (tmp_path / f"split{prompts}").mkdir()
        heldout = write_jsonl(tmp_path / f"split{prompts}" / "heldout.jsonl", records)
        summary = merge_to_files(tiny_model_dir, adapter_dir, tmp_path / f"merged{prompts}", tmp_path / "merge.json",
                                 heldout_path=heldout, template="chat", method="lora")
        # Every record is compared, on its first 512 tokens; the normal ones on the same tokens as before.
        assert (summary["check_prompts"], summary["check_tokens"]) == (prompts, tokens)
        assert summary["max_relative_logit_difference"] <= 1e-3


def test_same_seed_gives_byte_identical_adapters(tiny_model_dir, prepared_dir, tmp_path):
    for attempt in ("first", "second"):
        train_to_files(tiny_model_dir, prepared_dir, tmp_path / attempt, tmp_path / f"{attempt}.json", TINY_RUN,
                       "chat")
    first = (tmp_path / "first/adapter_model.safetensors").read_bytes()
    assert first == (tmp_path / "second/adapter_model.safetensors").read_bytes()
    curves = [read_json(tmp_path / f"{attempt}.json")["loss_curve"] for attempt in ("first", "second")]
    assert curves[0] == curves[1]
