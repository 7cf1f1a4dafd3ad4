"""train: one run of the grid with the transformers Trainer, peft and bitsandbytes."""

from __future__ import annotations

import logging
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from . import modeling
from .common import LoragridError, atomic_dir, provenance, read_json, read_jsonl, write_json
from .templates import tokenize_split

log = logging.getLogger("loragrid.train")


def load_tokenizer(model_dir, trust_remote_code: bool = False, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def peak_memory() -> dict:
    # ru_maxrss is in KiB on Linux: the whole process's high-water mark, loading included.
    memory = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        memory["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        memory["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return memory


def train(model_dir, data_dir, out_dir, settings: dict, template: str, trust_remote_code: bool = False) -> dict:
    """Train one run; writes the adapter (or the full model) to `out_dir` and returns train.json's content."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    set_seed(settings["seed"])
    method = settings["method"]
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    records = read_jsonl(Path(data_dir) / "train.jsonl")
    examples, tokenization = tokenize_split(
        tokenizer, template, records, settings["cutoff_len"], settings["train_on_inputs"], settings["add_eos_token"]
    )
    if not examples:
        raise LoragridError(f"config key 'cutoff_len': every prompt in {data_dir}/train.jsonl is longer than {settings['cutoff_len']} tokens")
    if tokenization["dropped_prompt_too_long"] or tokenization["truncated"]:
        log.warning("cutoff_len %d: %d records dropped (prompt too long), %d answers truncated",
                    settings["cutoff_len"], len(tokenization["dropped_prompt_too_long"]), tokenization["truncated"])
    dataset = Dataset.from_list([{**e, "length": len(e["input_ids"])} for e in examples])

    model = modeling.load_for_training(model_dir, method, trust_remote_code)
    weights = modeling.weights_bytes(model)
    if method != "full":
        model = modeling.add_lora(model, settings)
    trainable, total = modeling.count_parameters(model)
    log.info("%s: %d of %d parameters trainable (%.2f%%), weights %.1f MB",
             method, trainable, total, 100 * trainable / total, weights / 1e6)

    on_cpu = not torch.cuda.is_available()
    dtype = modeling.compute_dtype()
    with tempfile.TemporaryDirectory(prefix="loragrid-trainer-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=settings["micro_batch_size"],
            gradient_accumulation_steps=settings["gradient_accumulation_steps"],
            learning_rate=settings["learning_rate"],
            lr_scheduler_type=settings["lr_scheduler_type"],
            warmup_steps=settings["warmup_ratio"],
            num_train_epochs=settings["epochs"],
            max_steps=settings["max_steps"],
            weight_decay=settings["weight_decay"],
            seed=settings["seed"],
            data_seed=settings["seed"],
            # The Trainer only allows bf16 on a CPU together with use_cpu.
            use_cpu=on_cpu,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            train_sampling_strategy="group_by_length",
            include_num_input_tokens_seen="non_padding",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=False,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
            processing_class=tokenizer,
        )
        started = time.perf_counter()
        result = trainer.train()
        wall = time.perf_counter() - started

    if trainer.is_world_process_zero():  # under DDP (loragrid.launch) one process writes
        with atomic_dir(out_dir) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)

    losses = [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]
    tokens = int(trainer.state.num_input_tokens_seen)
    return {
        "method": method,
        "parameters": {"trainable": int(trainable), "total": int(total), "trainable_percent": 100 * trainable / total},
        "memory": {**peak_memory(), "weights_bytes": int(weights)},
        "device": "cuda" if not on_cpu else "cpu",
        "compute_dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "train_examples": len(examples),
        "tokenization": {"dropped_prompt_too_long": len(tokenization["dropped_prompt_too_long"]),
                         "truncated": tokenization["truncated"]},
        "steps": trainer.state.global_step,
        "wall_seconds": wall,
        "train_runtime_seconds": result.metrics["train_runtime"],
        "tokens_seen_non_padding": tokens,
        "tokens_per_second": tokens / result.metrics["train_runtime"],
        "final_loss": losses[-1]["loss"] if losses else None,
        "loss_curve": losses,
        "provenance": provenance({**settings, "template": template},
                                 {"model": model_dir, "train_split": Path(data_dir) / "train.jsonl"},
                                 dataset_sha256=read_json(Path(data_dir) / "prepare.json")["input_sha256"]),
    }


def train_to_files(model_dir, data_dir, weights_dir, train_json, settings, template, trust_remote_code=False) -> dict:
    summary = train(model_dir, data_dir, weights_dir, settings, template, trust_remote_code)
    if int(os.environ.get("RANK", 0)) == 0:  # under DDP (loragrid.launch) one process writes
        write_json(train_json, summary)
    return summary
