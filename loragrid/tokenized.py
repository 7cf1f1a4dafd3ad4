"""tokenize: a prepared train split turned into token ids once, for every run that shares the settings.

Tokenization depends on the tokenizer (the model), the template and three run settings; a grid
that varies anything else (method, learning rate, rank, ...) trains every run from the same
tokenized split instead of tokenizing it again per run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .common import LoragridError, atomic_dir, read_json, read_jsonl, sha256_file, verify_folder, write_json
from .templates import tokenize_split

log = logging.getLogger("loragrid.tokenized")

TOKENIZATION_SETTINGS = ("cutoff_len", "train_on_inputs", "add_eos_token")


def tokenization_settings(settings: dict) -> dict:
    return {key: settings[key] for key in TOKENIZATION_SETTINGS}


def tokenization_name(settings: dict) -> str:
    """The folder name of a run's tokenized split, readable: e.g. `cutoff256-answers-eos`."""
    trained_on = "inputs" if settings["train_on_inputs"] else "answers"
    eos = "eos" if settings["add_eos_token"] else "noeos"
    return f"cutoff{settings['cutoff_len']}-{trained_on}-{eos}"


def load_tokenizer(model_dir, trust_remote_code: bool = False, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def build_dataset(tokenizer, template: str, data_dir, settings: dict):
    """(datasets.Dataset of input_ids, attention_mask, labels and length; what cutoff_len did)."""
    from datasets import Dataset

    records = read_jsonl(Path(data_dir) / "train.jsonl")
    examples, tokenization = tokenize_split(
        tokenizer, template, records, settings["cutoff_len"], settings["train_on_inputs"], settings["add_eos_token"]
    )
    if not examples:
        raise LoragridError(f"config key 'cutoff_len': every prompt in {data_dir}/train.jsonl "
                            f"is longer than {settings['cutoff_len']} tokens")
    if tokenization["dropped_prompt_too_long"] or tokenization["truncated"]:
        log.warning("cutoff_len %d: %d records dropped (prompt too long), %d answers truncated",
                    settings["cutoff_len"], len(tokenization["dropped_prompt_too_long"]), tokenization["truncated"])
    # `length` is what the Trainer's length-grouped sampler sorts by.
    return Dataset.from_list([{**e, "length": len(e["input_ids"])} for e in examples]), tokenization


def tokenize_to_disk(model_dir, data_dir, out_dir, settings: dict, template: str,
                     trust_remote_code: bool = False) -> dict:
    """Write the tokenized train split (Arrow) and tokenize.json into `out_dir`; returns the summary."""
    for folder in (model_dir, data_dir):
        verify_folder(folder)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    dataset, tokenization = build_dataset(tokenizer, template, data_dir, settings)
    summary = {
        "settings": {**tokenization_settings(settings), "template": template},
        "train_sha256": sha256_file(Path(data_dir) / "train.jsonl"),
        "examples": len(dataset),
        "tokens": int(sum(dataset["length"])),
        "tokenization": {"dropped_prompt_too_long": tokenization["dropped_prompt_too_long"],
                         "truncated": tokenization["truncated"]},
    }
    with atomic_dir(out_dir) as staging:
        dataset.save_to_disk(str(staging / "dataset"))
        write_json(staging / "tokenize.json", summary)
    log.info("tokenized %d examples (%d tokens) with %s", summary["examples"], summary["tokens"],
             tokenization_name(settings))
    return summary


def load_tokenized(tokenized_dir, data_dir, settings: dict, template: str):
    """The tokenized split of `tokenized_dir`, after checking it was made from this split with these settings."""
    from datasets import Dataset

    tokenized_dir = Path(tokenized_dir)
    summary = read_json(tokenized_dir / "tokenize.json")
    wanted = {**tokenization_settings(settings), "template": template}
    if summary["settings"] != wanted:
        raise LoragridError(f"{tokenized_dir}: tokenized with {summary['settings']}, but the run asks for {wanted}")
    prepared = read_json(Path(data_dir) / "prepare.json")["output_sha256"]["train.jsonl"]
    if summary["train_sha256"] != prepared:
        raise LoragridError(f"{tokenized_dir}: tokenized from another {data_dir}/train.jsonl "
                            "(sha256 differs from prepare.json); tokenize it again")
    return Dataset.load_from_disk(str(tokenized_dir / "dataset")), summary["tokenization"]
