"""generate: answer every held-out question with one model (the base or a trained run)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import modeling
from .common import package_versions, read_jsonl, verify_folder, write_json, write_jsonl
from .templates import answer_end_ids, question_text, record_token_ids
from .tokenized import load_tokenizer

log = logging.getLogger("loragrid.generate")


def generation_config(tokenizer, settings: dict, stop_ids: list[int] | None = None):
    """transformers' GenerationConfig of the generate settings; it stops at any of `stop_ids` (answer_end_ids)."""
    from transformers import GenerationConfig

    sampling = {"temperature": settings["temperature"], "top_p": settings["top_p"]} if settings["do_sample"] else {}
    return GenerationConfig(
        max_new_tokens=settings["max_new_tokens"],
        do_sample=settings["do_sample"],
        repetition_penalty=settings["repetition_penalty"],
        # `get`: generation records written before these keys existed (chat reads them) still load.
        num_beams=settings.get("num_beams", 1),
        no_repeat_ngram_size=settings.get("no_repeat_ngram_size", 0),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_ids or tokenizer.eos_token_id,
        **sampling,
    )


@torch.no_grad()
def generate(model_dir, heldout_path, out_path, meta_path, template: str, settings: dict,
             trust_remote_code: bool = False) -> dict:
    for folder in (model_dir, Path(heldout_path).parent):
        verify_folder(folder)
    # Sampling draws from torch's generator alone; transformers.set_seed would import peft and bitsandbytes
    # (1.5 of a generate job's 5 CPU-seconds on a tiny model, where it is all start-up). Greedy decoding
    # needs no seed (the workflow passes none: it would re-run the job for nothing).
    if settings["do_sample"]:
        torch.manual_seed(settings["seed"])
    tokenizer = load_tokenizer(model_dir, trust_remote_code, padding_side="left")
    stop_ids = answer_end_ids(tokenizer, template)  # a chat template's own end of turn beside EOS
    config = generation_config(tokenizer, settings, stop_ids)
    records = read_jsonl(heldout_path)
    # Prompts before the model: a template the tokenizer cannot render (no chat template) fails before the load.
    prompts = [record_token_ids(tokenizer, template, record) for record in records]
    model = modeling.load_for_inference(model_dir, trust_remote_code=trust_remote_code)
    # Similar lengths in a batch waste less compute on left padding.
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))
    answers: dict[int, dict] = {}
    new_tokens_total, seconds_total = 0, 0.0
    batch_size = settings["batch_size"]
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch"):
        indices = order[start : start + batch_size]
        batch = tokenizer.pad([{"input_ids": prompts[i]} for i in indices], return_tensors="pt").to(model.device)
        started = time.perf_counter()
        output = model.generate(**batch, generation_config=config)
        seconds_total += time.perf_counter() - started
        for row, i in enumerate(indices):
            new = output[row, batch["input_ids"].shape[1] :].tolist()
            ends = [position for position, token in enumerate(new) if token in stop_ids]
            finished = bool(ends)
            if finished:
                new = new[: ends[0]]
            new_tokens_total += len(new)
            answers[i] = {"answer": tokenizer.decode(new, skip_special_tokens=True).strip(),
                          "new_tokens": len(new), "finished": finished}

    write_jsonl(out_path, [
        {"id": record["id"], "question": question_text(record),
         "reference": record["messages"][-1]["content"], **answers[i]}
        for i, record in enumerate(records)
    ])
    meta = {
        "model_dir": str(model_dir),
        "template": template,
        "settings": settings,
        "questions": len(records),
        "new_tokens": new_tokens_total,
        "generate_seconds": seconds_total,
        "tokens_per_second": new_tokens_total / seconds_total if seconds_total else None,
        "dtype": str(model.dtype).replace("torch.", ""),
        "versions": package_versions(),
    }
    write_json(meta_path, meta)
    log.info("%d answers, %.1f new tokens/s", len(records), meta["tokens_per_second"] or 0)
    return meta
