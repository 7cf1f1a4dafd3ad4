"""evaluate: held-out loss on the reference answers, chrF and the emoji style metric of the generations."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import modeling
from .common import LoragridError, provenance, read_json, read_jsonl, verify_folder, write_json
from .templates import IGNORE_INDEX, tokenize_split
from .tokenized import load_tokenizer
from .train import takes_logits_mask

log = logging.getLogger("loragrid.evaluate")

# Long enough that no held-out answer is cut: every model is scored on the same tokens.
EVAL_CUTOFF_LEN = 2048


def heldout_examples(tokenizer, template: str, records: list[dict], heldout_path) -> list[dict]:
    """The held-out records tokenized for heldout_loss, less those whose answer starts beyond EVAL_CUTOFF_LEN."""
    examples, cut = tokenize_split(tokenizer, template, records, EVAL_CUTOFF_LEN)
    dropped = cut["dropped_prompt_too_long"]
    if dropped:
        # Named, so that a loss over fewer records than `questions` is not read as the whole split's.
        log.warning("held-out loss leaves out %d of %d records, whose answer starts beyond %d tokens: %s",
                    len(dropped), len(records), EVAL_CUTOFF_LEN, "; ".join(dropped))
    if not examples:
        raise LoragridError(f"{heldout_path}: none of its {len(records)} records has an answer within the first "
                            f"{EVAL_CUTOFF_LEN} tokens (evaluate's cutoff), so there is no held-out loss to compute")
    return examples


@torch.no_grad()
def heldout_loss(model, tokenizer, examples: list[dict], batch_size: int) -> dict:
    """Mean negative log-likelihood per answer token (EOS included), in fp32 for a stable number.

    `examples` come from heldout_examples, which fails before any model is loaded when none is left.
    """
    # Similar lengths in a batch pad less; the sum over answer tokens does not depend on the order.
    examples = sorted(examples, key=lambda example: len(example["input_ids"]))
    labelled_only = takes_logits_mask(model)
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(examples), batch_size), desc="held-out loss", unit="batch"):
        chunk = examples[start : start + batch_size]
        batch = tokenizer.pad([{"input_ids": e["input_ids"]} for e in chunk], return_tensors="pt").to(model.device)
        longest = batch["input_ids"].shape[1]
        # load_tokenizer pads on the right, so labels are padded the same way; position t predicts t + 1.
        labels = torch.tensor([e["labels"][1:] + [IGNORE_INDEX] * (longest - len(e["labels"]) + 1) for e in chunk],
                              device=model.device)
        keep = labels != IGNORE_INDEX
        if labelled_only:  # the vocabulary projection only where an answer token is predicted (train.py)
            logits = model(**batch, logits_to_keep=keep).logits.float()
            logits = logits.reshape(-1, logits.shape[-1])
        else:
            logits = model(**batch).logits.float()[keep]
        total_nll += torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum").item()
        total_tokens += int(keep.sum())
    loss = total_nll / total_tokens
    return {"heldout_loss": loss, "heldout_perplexity": math.exp(loss), "heldout_answer_tokens": total_tokens,
            "heldout_scored": len(examples)}


def emoji_metrics(texts: list[str]) -> dict:
    import emoji

    counts = [emoji.emoji_count(text) for text in texts]
    return {
        "emoji_share": sum(c > 0 for c in counts) / len(counts),
        "emoji_per_answer": sum(counts) / len(counts),
    }


def evaluate(model_dir, heldout_path, generations_path, generation_meta_path, template: str,
             batch_size: int = 8, trust_remote_code: bool = False) -> dict:
    import sacrebleu

    for folder in (model_dir, Path(heldout_path).parent):
        verify_folder(folder)
    records = read_jsonl(heldout_path)
    generations = read_jsonl(generations_path)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    examples = heldout_examples(tokenizer, template, records, heldout_path)
    model = modeling.load_for_inference(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    result = heldout_loss(model, tokenizer, examples, batch_size)

    answers = [g["answer"] for g in generations]
    references = [g["reference"] for g in generations]
    result["chrf"] = sacrebleu.corpus_chrf(answers, [references]).score
    result.update(emoji_metrics(answers))
    result["reference_emoji_share"] = emoji_metrics(references)["emoji_share"]
    result["finished_share"] = sum(g["finished"] for g in generations) / len(generations)
    result["mean_new_tokens"] = sum(g["new_tokens"] for g in generations) / len(generations)
    result["generation_tokens_per_second"] = read_json(generation_meta_path)["tokens_per_second"]
    result["questions"] = len(records)
    result["template"] = template
    result["provenance"] = provenance(
        {"template": template, "batch_size": batch_size, "generation": read_json(generation_meta_path)["settings"]},
        {"model": model_dir, "heldout_split": heldout_path, "generations": generations_path},
        dataset_sha256=read_json(Path(heldout_path).parent / "prepare.json")["input_sha256"],
    )
    log.info("held-out loss %.3f, chrF %.1f, emoji share %.2f",
             result["heldout_loss"], result["chrf"], result["emoji_share"])
    return result


def evaluate_to_file(out_path, **kwargs) -> dict:
    result = evaluate(**kwargs)
    write_json(out_path, result)
    return result
