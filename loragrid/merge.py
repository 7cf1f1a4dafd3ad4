"""merge: fold an adapter into an unquantized copy of its base model, and prove it changed nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import modeling
from .common import LoragridError, atomic_dir, read_json, read_jsonl, verify_folder, write_json
from .templates import record_token_ids
from .tokenized import load_tokenizer

log = logging.getLogger("loragrid.merge")

# Enough tokens per conversation to show a merge that moved the logits, at the cost of a few forwards.
CHECK_CUTOFF_LEN = 512


def _check_batch(tokenizer, template: str, heldout_path, n_prompts: int) -> dict:
    """The first held-out conversations, as training tokenizes them (cut to CHECK_CUTOFF_LEN), padded into one batch.

    The check compares logits at every position, so it needs no answer token: a conversation whose
    answer lies beyond the cut is compared on its first tokens rather than left out.
    """
    records = read_jsonl(heldout_path)[:n_prompts]
    if not records:
        raise LoragridError(f"{heldout_path}: no held-out records to compare the merged model's logits on")
    ids = [record_token_ids(tokenizer, template, r, whole=True)[:CHECK_CUTOFF_LEN] for r in records]
    return tokenizer.pad([{"input_ids": i, "attention_mask": [1] * len(i)} for i in ids], return_tensors="pt")


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    # On a GPU the quantized model sits on the device while the fp32 merge runs on the CPU: each
    # forward takes the batch to its model's device, and the logits come back for the comparison.
    on_device = {name: tensor.to(model.device) for name, tensor in batch.items()}
    logits = model(**on_device).logits.float()
    return logits[on_device["attention_mask"].bool()].cpu()


def _relative_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    return ((reference - other).abs().max() / reference.abs().max()).item()


def merge(base_dir, adapter_dir, out_dir, heldout_path, template: str, method: str,
          check_prompts: int = 4, tolerance: float = 1e-3, trust_remote_code: bool = False,
          quantization: dict | None = None) -> dict:
    """Merge the adapter into an fp32 copy of the base and check the logits did not move.

    `quantization` holds the run's bnb_4bit_* settings, so that a QLoRA adapter is also compared
    against the quantized model it was trained on (the schema's defaults without it).
    """
    for folder in (base_dir, adapter_dir, Path(heldout_path).parent):
        verify_folder(folder)
    tokenizer = load_tokenizer(adapter_dir, trust_remote_code)
    batch = _check_batch(tokenizer, template, heldout_path, check_prompts)

    # Merging happens in fp32 so the check measures the merge, not bf16 rounding.
    base = modeling.load_causal_lm(base_dir, torch.float32, trust_remote_code)
    with_adapter = modeling.load_adapter(base, adapter_dir).eval()
    adapter_logits = _logits(with_adapter, batch)
    merged = with_adapter.merge_and_unload()
    merged_logits = _logits(merged, batch)
    difference = _relative_difference(adapter_logits, merged_logits)
    log.info("merged vs adapter logits: max relative difference %.2e (tolerance %.0e)", difference, tolerance)
    if not difference <= tolerance:
        raise LoragridError(
            f"merging {adapter_dir} changed the logits by {difference:.2e} (relative), more than "
            f"merge.tolerance = {tolerance:.0e}; the merged model is not written"
        )

    summary = {
        "method": method,
        "check_prompts": int(batch["input_ids"].shape[0]),
        "check_tokens": int(batch["attention_mask"].sum()),
        "tolerance": tolerance,
        "max_relative_logit_difference": difference,
        "merged_dtype": "float32",
    }
    if method in ("qlora4", "qlora8"):
        # The adapter learned against quantized weights; the merged model uses the original
        # ones (as the usual QLoRA recipes do). Record how far that moves the logits.
        quantized = modeling.load_for_training(base_dir, method, trust_remote_code, quantization)
        summary["quantization_of_training_model"] = modeling.quantization_summary(quantized)
        quantized_logits = _logits(modeling.load_adapter(quantized, adapter_dir).eval(), batch)
        summary["relative_logit_difference_vs_quantized_training_model"] = _relative_difference(
            quantized_logits, merged_logits
        )
        del quantized

    with atomic_dir(out_dir) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if _from_pickle(base_dir):
            # A torch: base came as a pickled {'model', 'tokenizer'}; the tools that made it read that form back.
            modeling.save_pickled(merged, tokenizer, staging)
            summary["pickled_model"] = modeling.PICKLED_MODEL
    return summary


def _from_pickle(base_dir) -> bool:
    source = Path(base_dir) / "source.json"
    return source.exists() and read_json(source)["source"].startswith("torch:")


def merge_to_files(base_dir, adapter_dir, out_dir, merge_json, **kwargs) -> dict:
    summary = merge(base_dir, adapter_dir, out_dir, **kwargs)
    write_json(merge_json, summary)
    return summary
