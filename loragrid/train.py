"""train: one run of the grid with the transformers Trainer, peft and bitsandbytes.

Checkpoints go to `checkpoint_root/<settings hash>/`, beside the declared outputs: Snakemake
deletes a dead job's outputs, not this folder, so a killed run resumes where it stopped, and
only from a checkpoint of exactly the same settings, model and data.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import re
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from . import launch, memory, modeling
from .common import (
    LoragridError,
    atomic_dir,
    checksums,
    provenance,
    read_json,
    settings_hash,
    sha256_file,
    verify_folder,
    write_json,
)
from .config import accumulation_steps
from .estimate import unknown_shape
from .templates import IGNORE_INDEX
from .tokenized import build_dataset, load_tokenized, load_tokenizer

log = logging.getLogger("loragrid.train")

BNB_OPTIMIZERS = ("adamw_bnb_8bit", "paged_adamw_8bit")
# Settings that decide where and how often state is written, not what is learned: changing
# them must not throw away a checkpoint.
NOT_IN_CHECKPOINT_HASH = ("save_steps", "save_total_limit", "report_to")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Where compiled layers are cached when the caller names no folder (the workflow passes compile_cache).
DEFAULT_COMPILE_CACHE = "resources/torch-compile-cache"


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory() -> dict:
    # ru_maxrss is in KiB on Linux: the whole process's high-water mark, loading included.
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def check_optimizer(optimizer: str, device: str) -> None:
    """Fail before training where bitsandbytes' 8-bit optimizers do not run on this device."""
    if optimizer not in BNB_OPTIMIZERS:
        return
    import bitsandbytes

    optimizer_class = (bitsandbytes.optim.PagedAdamW8bit if optimizer.startswith("paged")
                       else bitsandbytes.optim.AdamW8bit)
    try:
        probe = torch.nn.Parameter(torch.zeros(64, 64, device=device))
        probe.grad = torch.ones_like(probe)
        optimizer_class([probe], lr=1e-3).step()
    except Exception as error:  # bitsandbytes raises RuntimeError / NotImplementedError per backend
        raise LoragridError(f"config key 'optimizer': {optimizer} does not run on {device} with bitsandbytes "
                            f"{bitsandbytes.__version__}: {error}") from error
    if optimizer.startswith("paged") and device == "cpu":
        log.warning("optimizer %s: paging needs CUDA; on a CPU bitsandbytes runs it as adamw_bnb_8bit", optimizer)


def check_dora(settings: dict) -> None:
    """Fail before loading where peft's DoRA does not train on bitsandbytes' 8-bit layers on this device. With
    peft 0.21.2 and bitsandbytes 0.50.2 on a CPU, the second pass through such a layer finds its int8 scales
    gone (an AttributeError inside bitsandbytes' matmul): two passes through a 64 x 64 layer, built and run
    as training builds and runs them (transformers' outlier threshold 6.0, autocast), tell."""
    if not (settings.get("use_dora") and settings["method"] == "qlora8"):
        return
    import bitsandbytes
    import peft

    device = f"cuda:{modeling.process_gpu()}" if modeling.device() == "cuda" else "cpu"
    layer = bitsandbytes.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bitsandbytes.nn.Int8Params(torch.ones(64, 64), requires_grad=False, has_fp16_weights=False)
    probe = peft.get_peft_model(torch.nn.Sequential(layer).to(device),
                                peft.LoraConfig(r=4, target_modules=["0"], use_dora=True))
    try:
        with torch.autocast(device.partition(":")[0], dtype=modeling.compute_dtype()):
            for _ in range(2):
                probe(torch.ones(2, 64, device=device)).sum().backward()
    except AttributeError as error:  # the lost scales: `'NoneType' object has no attribute 'unsqueeze'`
        raise LoragridError(f"config key 'use_dora': DoRA does not train on qlora8's 8-bit layers on {device} with "
                            f"peft {peft.__version__} and bitsandbytes {bitsandbytes.__version__} "
                            f"({type(error).__name__}: {error}); use it with lora or qlora4") from error


def optimizer_summary(optimizer) -> dict:
    """What the Trainer built: class, state bits (bitsandbytes keeps 8-bit moments), paging, weight decay."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    kind = type(optimizer)
    # bitsandbytes keeps the state of parameters on a CPU unpaged, whatever the optimizer asks.
    on_cpu = all(p.device.type == "cpu" for group in optimizer.param_groups for p in group["params"])
    return {"class": f"{kind.__module__}.{kind.__name__}",
            "state_bits": getattr(getattr(optimizer, "args", None), "optim_bits", 32),
            "paged": bool(getattr(optimizer, "is_paged", False)) and not on_cpu,
            "weight_decay": max(group["weight_decay"] for group in optimizer.param_groups)}


def labelled_counts(dataset) -> list[int]:
    """Per example, the positions whose next token is trained on (their logits are the only ones computed)."""
    return [sum(1 for label in labels[1:] if label != IGNORE_INDEX) for labels in dataset["labels"]]


def longest_micro_batch(lengths: list[int], labelled: list[int], micro_batch_size: int, packing: bool) -> tuple:
    """(rows, padded sequence length, labelled positions) of the largest micro-batch (packed: one row)."""
    longest = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)[:micro_batch_size]
    sequence = sum(lengths[k] for k in longest) if packing else lengths[longest[0]]
    return (1 if packing else len(longest)), sequence, sum(labelled[k] for k in longest)


def choose_micro_batch(model, settings: dict, lengths: list[int], labelled: list[int],
                       runtime_bytes: int, resume_from=None) -> tuple[int, dict]:
    """micro_batch_size, or with max_memory_gb the largest divisor of batch_size whose estimate fits (resumed: the
    checkpoint's own).

    The estimate (loragrid.memory) is of the largest micro-batch; with the process's own resident
    memory before loading (`runtime_bytes`) it is what max_memory_gb is compared with.
    """
    batch = settings["batch_size"]

    def estimate(micro):
        rows, sequence, marked = longest_micro_batch(lengths, labelled, micro, settings["packing"])
        held = memory.estimate_for_model(model, settings, rows, sequence, marked, accumulation=batch // micro)
        if held is None:
            return None
        return {**held, "micro_batch_size": micro, "runtime_bytes": runtime_bytes,
                "process_bytes": held["total_bytes"] + runtime_bytes}

    limit = settings.get("max_memory_gb")
    if limit is None:
        return settings["micro_batch_size"], estimate(settings["micro_batch_size"])
    # Decided on the loaded config: transformers fills in what a config.json leaves to its defaults.
    no_estimate = unknown_shape(model.config.to_dict())
    if no_estimate:
        raise LoragridError(f"config key 'max_memory_gb' picks the micro-batch from the memory estimate: "
                            f"{no_estimate}. Set micro_batch_size instead")
    # runtime_bytes differs from one attempt to the next, and the data order (length grouping) and the kept memory
    # profile depend on the micro-batch: a resumed run keeps its first attempt's, as transformers' own
    # auto_find_batch_size does.
    trained_with = read_json(Path(resume_from) / "trainer_state.json").get("train_batch_size") if resume_from else None
    if trained_with:
        log.info("max_memory_gb: micro-batch %d, as %s trained with", trained_with, resume_from)
        return trained_with, estimate(trained_with)
    for micro in sorted((d for d in range(1, batch + 1) if batch % d == 0), reverse=True):
        candidate = estimate(micro)
        if candidate["process_bytes"] <= limit * 1e9:
            log.info("max_memory_gb %.2f: micro-batch %d fits (estimated %.2f GB); %d accumulation steps keep "
                     "the batch at %d", limit, micro, candidate["process_bytes"] / 1e9, batch // micro, batch)
            return micro, candidate
    raise LoragridError(f"config key 'max_memory_gb': even a micro-batch of 1 needs an estimated "
                        f"{candidate['process_bytes'] / 1e9:.2f} GB (> {limit} GB)")


def measured_memory(profile, model, weights: int, settings: dict, estimate: dict, accumulation: int,
                    resumed: bool) -> dict:
    """train.json's `memory`: the profile's measurement and the resident peaks; adds to `estimate`
    the formula at the measured step's shape (`at_measured_step`), to compare like for like."""
    measured = {**profile.summary(), **peak_memory(), "weights_bytes": int(weights),
                "weights_held": memory.weights_held(model)}
    if "peak_micro_batch" in measured and estimate is not None:
        estimate["at_measured_step"] = estimate_at_measured_step(model, settings, measured, accumulation, resumed)
    return measured


def estimate_at_measured_step(model, settings: dict, measured: dict, accumulation: int, resumed: bool) -> dict:
    """The estimate of the step whose peak was measured, as the measurement takes it: the highest over
    its micro-batches, each at its own shape, gradients held from the second micro-batch on (the
    first one's backward pass starts before any gradient exists) and optimizer state from the second
    step on."""
    step = next(step for step in measured["profiled_steps"] if step["step"] == measured["peak_step"])
    first_step = measured["peak_step"] == 1 and not resumed and not measured.get("peak_with_later_state")
    candidates = [memory.estimate_for_model(model, settings, shape["rows"], shape["sequence"], shape["labelled"],
                                            accumulation=accumulation if index else 1,
                                            optimizer_state=not first_step)
                  for index, shape in enumerate(step["micro_batches"])]
    return max(candidates, key=lambda candidate: candidate["total_bytes"])


def checkpoint_folder(checkpoint_root, settings: dict, template: str, model_dir, train_path) -> Path:
    """The folder for this run's checkpoints: named by the hash of everything that shapes training."""
    learned = {key: value for key, value in settings.items() if key not in NOT_IN_CHECKPOINT_HASH}
    model_source = Path(model_dir) / "source.json"
    identity = {
        "settings": learned,
        "template": template,
        "model": sha256_file(model_source) if model_source.exists() else settings_hash(checksums(model_dir)),
        "train_split": sha256_file(train_path),
    }
    return Path(checkpoint_root) / settings_hash(identity)[:16]


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint-N whose trainer_state.json is whole: the Trainer writes that file last (and
    in place), so a checkpoint cut short by a kill is never resumed from."""
    if not folder.is_dir():
        return None
    complete = [(int(m.group(1)), path) for path in folder.iterdir()
                if (m := CHECKPOINT.match(path.name)) and _whole_json(path / "trainer_state.json")]
    return max(complete)[1] if complete else None


def _whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def _drop_stale_checkpoints(folder: Path) -> None:
    if folder.parent.is_dir():
        for other in folder.parent.iterdir():
            if other != folder and other.is_dir():
                log.info("removing checkpoints of other settings: %s", other)
                shutil.rmtree(other, ignore_errors=True)


class LabelledLogitsOnly:
    """Wraps a collator so that the model computes logits only where a token is trained on.

    A causal LM's own loss projects every position onto the vocabulary (49k columns for SmolLM2,
    a fifth of its FLOPs) and upcasts those logits to fp32, though prompt and padding positions
    carry no label. transformers' `logits_to_keep` takes a boolean mask (positions whose next
    token has a label) and `shift_labels` the matching targets, so the model's own head and loss
    run on those positions only: the same loss, ~5% more tokens/s for SmolLM2 (bench/README.md).
    """

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:]
        keep = shifted != IGNORE_INDEX
        return {**batch, "logits_to_keep": keep, "shift_labels": shifted[keep]}


def causal_lm(model):
    """The transformers model inside peft's wrappers (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def return_loss_without_logits(module, inputs, output):
    """Forward hook for the causal LM under the Trainer: in training, where the loss was computed
    in the forward, the logits leave it no further. accelerate's mixed-precision wrapper converts
    every bf16 tensor a forward returns to fp32, and nothing in a training step reads the logits
    after the loss (bench/README.md: ~15 ms of a ~0.9-s SmolLM2 step)."""
    if module.training and isinstance(output, dict) and output.get("loss") is not None \
            and output.get("logits") is not None:
        return type(output)(**{key: value for key, value in output.items() if key != "logits"})
    return output


def takes_logits_mask(model) -> bool:
    """Whether the model's forward slices its hidden states with transformers' `slice_logits_to_keep`,
    the helper that accepts a boolean mask (transformers' own architectures; remote code may not)."""
    import inspect

    forward = inspect.unwrap(type(causal_lm(model)).forward)
    return "slice_logits_to_keep" in forward.__code__.co_names


def data_collator(tokenizer, packing: bool, labelled_logits_only: bool):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        # One row per micro-batch; position ids restart at each example, from which transformers
        # builds a block-diagonal mask, so no example attends to another.
        collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    return LabelledLogitsOnly(collator) if labelled_logits_only else collator


def trainer_class():
    import transformers

    class Trainer(transformers.Trainer):
        """transformers' Trainer, counting the model's parameters for its FLOP log once instead of
        every step (the count walks every module: 15 ms of a 0.9-s SmolLM2 LoRA step on a CPU)."""

        @functools.cached_property
        def parameters_without_embeddings(self) -> int:
            return self.model.num_parameters(exclude_embeddings=True)

        def floating_point_ops(self, inputs) -> int:
            main_input = getattr(self.model, "main_input_name", "input_ids")
            if main_input in inputs and hasattr(self.model, "num_parameters"):
                return 6 * inputs[main_input].numel() * self.parameters_without_embeddings
            return 0

    return Trainer


def warmup(settings: dict) -> int | float:
    """TrainingArguments' warmup_steps: the run's `warmup_steps` when set, else its `warmup_ratio`
    (transformers 5 reads a float below 1 as a share of the total steps, an integer as steps).
    `get`: settings written before warmup_steps existed still train as they did."""
    steps = settings.get("warmup_steps")
    return int(steps) if steps is not None else settings["warmup_ratio"]


def check_reporting(settings: dict, tensorboard_dir, wandb_dir) -> None:
    """Fail before loading anything where report_to has no folder to write to or no library."""
    report_to = settings["report_to"]
    if report_to == "tensorboard" and tensorboard_dir is None:
        raise LoragridError("config key 'report_to': tensorboard needs a folder to write to")
    if report_to == "wandb":
        if wandb_dir is None and tensorboard_dir is None:
            raise LoragridError("config key 'report_to': wandb needs a folder to write to")
        try:
            import wandb  # noqa: F401
        except ImportError as error:
            raise LoragridError(f"config key 'report_to': wandb is not installed ({error}); "
                                "requirements.txt pins the version loragrid is tested with") from error


@contextlib.contextmanager
def wandb_run(folder, settings: dict, run_name: str | None):
    """A W&B run around training, finished on the way out; yields its run folder (None on other ranks).

    Started here rather than by transformers' WandbCallback (which reuses an active run) so that
    its folder, mode and name are arguments, and finished here because the callback never calls
    wandb.finish(): a second run in the same process would continue the first. Offline unless
    the user's WANDB_MODE says otherwise, so that a job needs no login and no network.
    """
    import wandb

    if int(os.environ.get("RANK", 0)) != 0:  # under DDP the callback logs from rank 0 only
        yield None
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Read here and passed on: wandb reads its environment once per process, at its first run.
    run = wandb.init(dir=str(folder.resolve()), project=os.environ.get("WANDB_PROJECT", "loragrid"),
                     name=run_name, mode=os.environ.get("WANDB_MODE") or "offline", config={"loragrid": settings})
    written = Path(run.settings.sync_dir)  # WANDB_MODE=disabled writes nothing, and not there
    exit_code = 1
    try:
        yield folder / written.relative_to(folder.resolve()) if written.is_relative_to(folder.resolve()) else None
        exit_code = 0
    finally:
        run.finish(exit_code=exit_code)


@contextlib.contextmanager
def reporting(settings: dict, tensorboard_dir=None, wandb_dir=None, run_name: str | None = None):
    """Where report_to's library writes, from before the Trainer is built to the end of training;
    yields the wandb run folder or None."""
    if settings["report_to"] == "tensorboard":
        # transformers 5's TensorBoard callback takes its folder from this variable, when it is built.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(tensorboard_dir).resolve())
    if settings["report_to"] != "wandb":
        yield None
        return
    with wandb_run(wandb_dir if wandb_dir is not None else tensorboard_dir, settings, run_name) as folder:
        yield folder


def make_trainer(model, tokenizer, dataset, settings: dict, micro_batch_size: int, output_dir, saving: bool):
    """The Trainer for one run: every training setting reaches TrainingArguments here."""
    from transformers import TrainingArguments

    dtype = modeling.compute_dtype()
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=accumulation_steps(settings, micro_batch_size=micro_batch_size),
        learning_rate=settings["learning_rate"],
        lr_scheduler_type=settings["lr_scheduler_type"],
        warmup_steps=warmup(settings),
        num_train_epochs=settings["epochs"],
        max_steps=settings["max_steps"],
        optim=settings["optimizer"],
        weight_decay=settings["weight_decay"],
        activation_checkpointing=settings["gradient_checkpointing"],
        seed=settings["seed"],
        data_seed=settings["seed"],
        # The Trainer only allows bf16 on a CPU together with use_cpu.
        use_cpu=modeling.device() == "cpu",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        train_sampling_strategy="group_by_length" if settings["group_by_length"] else "random",
        # Packed rows hold no padding, and no attention mask to tell it by: the Trainer's "non_padding" would skip
        # every token equal to the pad token (EOS, or SmolLM2's <|im_end|> that ends each turn).
        include_num_input_tokens_seen="all" if settings["packing"] else "non_padding",
        logging_steps=1,
        save_strategy="steps" if saving else "no",
        save_steps=settings["save_steps"] or 1,
        save_total_limit=settings["save_total_limit"],
        report_to=settings["report_to"],
        disable_tqdm=False,
    )
    collator = data_collator(tokenizer, settings["packing"], takes_logits_mask(model))
    return trainer_class()(model=model, args=args, train_dataset=dataset, data_collator=collator,
                           processing_class=tokenizer, callbacks=[step_timer()])


def step_timer():
    """A Trainer callback that keeps each optimizer step's wall time (train.json's step_seconds):
    where a step is slow (the profiled first two, a compiling one) shows there, not only the mean."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.seconds, self.started = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(round(time.perf_counter() - self.started, 4))

    return StepTimes()


def step_seconds(trainer) -> list[float]:
    return next(c.seconds for c in trainer.callback_handler.callbacks if hasattr(c, "seconds"))


def compile_after_profiling(profile, cache_dir):
    """A Trainer callback that compiles the decoder layers (modeling.compile_decoder_layers) once
    the memory profile has measured its steps: dynamo skips for good a frame it first meets
    under the profile's dispatch mode, so compiling earlier would leave every step eager."""
    from transformers import TrainerCallback

    class CompileLayers(TrainerCallback):
        compiled = False

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if not self.compiled and profile.done:
                modeling.compile_decoder_layers(model, cache_dir)
                self.compiled = True

    return CompileLayers()


@contextlib.contextmanager
def objects_so_far_frozen():
    """Keeps the objects that exist before training (modules, tokenizer, libraries) out of the
    garbage collector's full passes while training: one such pass over them took 0.29 s of a
    14-s SmolLM2 run, 2 % (bench/README.md). They are alive throughout anyway."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _check_before_loading(settings: dict, model_dir, folders, tensorboard_dir, wandb_dir) -> None:
    """Everything that can fail cheaply fails before the model loads."""
    for folder in (model_dir, *folders):
        if folder is not None:
            verify_folder(folder)
    unmatched = modeling.unmatched_target_modules(model_dir, settings)
    if unmatched:
        raise LoragridError(f"config key 'target_modules': {unmatched}")
    check_optimizer(settings["optimizer"], modeling.device())
    check_dora(settings)
    accumulation_steps(settings)
    check_reporting(settings, tensorboard_dir, wandb_dir)


def _setup_data(model_dir, data_dir, tokenized_dir, settings: dict, template: str, trust_remote_code: bool):
    """(tokenizer, dataset, tokenization report): read as the tokenize rule wrote it, or tokenized here."""
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    if tokenized_dir is not None:
        dataset, tokenization = load_tokenized(tokenized_dir, data_dir, settings, template)
    else:
        dataset, tokenization = build_dataset(tokenizer, template, data_dir, settings)
    if len(dataset) < settings["batch_size"]:
        log.warning("the training split has %d examples, fewer than batch_size %d: every step trains on all of "
                    "them, and the held-out split may be the larger (split.heldout_min)", len(dataset),
                    settings["batch_size"])
    return tokenizer, dataset, tokenization


def _setup_model(model_dir, settings: dict, trust_remote_code: bool):
    """(model ready to train, bytes of its weights as loaded, (trainable, total) parameters)."""
    method = settings["method"]
    model = modeling.load_for_training(model_dir, method, trust_remote_code, settings)
    weights = modeling.weights_bytes(model)
    if method != "full":
        model = modeling.add_lora(model, settings)
    trainable, total = modeling.count_parameters(model)
    log.info("%s: %d of %d parameters trainable (%.2f%%), weights %.1f MB",
             method, trainable, total, 100 * trainable / total, weights / 1e6)
    causal_lm(model).register_forward_hook(return_loss_without_logits)
    return model, weights, (trainable, total)


def _setup_checkpoints(checkpoint_root, settings: dict, template: str, model_dir, data_dir):
    """(this run's checkpoint folder or None, the checkpoint to resume from or None)."""
    if checkpoint_root is None:
        return None, None
    checkpoints = checkpoint_folder(checkpoint_root, settings, template, model_dir, Path(data_dir) / "train.jsonl")
    _drop_stale_checkpoints(checkpoints)
    resume_from = last_complete_checkpoint(checkpoints)
    if resume_from:
        log.info("resuming from %s", resume_from)
    return checkpoints, resume_from


def _log_estimate(estimate: dict | None, model) -> None:
    if estimate is None:
        log.warning("%s. The measured training memory still holds", unknown_shape(model.config.to_dict()))
        return
    log.info("estimated training memory %.2f GB (%s; micro-batch %d x %d tokens, %d labelled), process %.2f GB",
             estimate["total_bytes"] / 1e9, ", ".join(f"{k} {v / 1e9:.2f}" for k, v in estimate["breakdown"].items()),
             estimate["rows"], estimate["sequence"], estimate["labelled"], estimate["process_bytes"] / 1e9)
    if estimate["unchecked_architecture"]:
        log.warning(estimate["unchecked_architecture"])


def _save(model, tokenizer, trainer, out_dir, model_dir, method: str) -> None:
    with atomic_dir(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        trainer.state.save_to_json(str(staging / "trainer_state.json"))
        if method == "full" and (Path(model_dir) / modeling.PICKLED_MODEL).exists():
            modeling.save_pickled(model, tokenizer, staging)  # pruned shapes: only the pickle loads again


def train(model_dir, data_dir, out_dir, settings: dict, template: str, trust_remote_code: bool = False,
          checkpoint_root=None, tensorboard_dir=None, tokenized_dir=None, wandb_dir=None,
          run_name: str | None = None, compile_cache_dir=None) -> dict:
    """Train one run; writes the adapter (or the full model) to `out_dir` and returns train.json's content.

    With `tokenized_dir` (the tokenize rule's output), the split is read as tokenized there;
    without it, the split in `data_dir` is tokenized here.

    With `checkpoint_root`, checkpoints are written every `save_steps` and a previous attempt's
    last checkpoint of the same settings is resumed; without it, training keeps no checkpoints.

    report_to: wandb writes its run under `wandb_dir` (without it, under `tensorboard_dir`, the
    run's logging folder), named `run_name`.
    """
    from transformers import set_seed

    _check_before_loading(settings, model_dir, (data_dir, tokenized_dir), tensorboard_dir, wandb_dir)
    set_seed(settings["seed"])
    tokenizer, dataset, tokenization = _setup_data(model_dir, data_dir, tokenized_dir, settings, template,
                                                   trust_remote_code)
    runtime_bytes = current_rss_bytes()
    model, weights, parameters = _setup_model(model_dir, settings, trust_remote_code)
    checkpoints, resume_from = _setup_checkpoints(checkpoint_root, settings, template, model_dir, data_dir)
    micro_batch_size, estimate = choose_micro_batch(model, settings, dataset["length"], labelled_counts(dataset),
                                                    runtime_bytes, resume_from)
    _log_estimate(estimate, model)
    saving = checkpoints is not None and settings["save_steps"] > 0
    with tempfile.TemporaryDirectory(prefix="loragrid-trainer-") as scratch, \
            reporting(settings, tensorboard_dir, wandb_dir, run_name) as wandb_folder:
        trainer = make_trainer(model, tokenizer, dataset, settings, micro_batch_size,
                               output_dir=checkpoints if saving else scratch, saving=saving)
        profile = memory.memory_profile(settings, dataset["length"], resume_from)
        trainer.add_callback(profile)
        if settings.get("compile_layers"):
            trainer.add_callback(compile_after_profiling(profile, compile_cache_dir or DEFAULT_COMPILE_CACHE))
        started = time.perf_counter()
        with objects_so_far_frozen():
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        wall = time.perf_counter() - started
    if trainer.is_world_process_zero():  # under DDP (loragrid.launch) one process writes
        _save(model, tokenizer, trainer, out_dir, model_dir, settings["method"])

    accumulation = accumulation_steps(settings, micro_batch_size=micro_batch_size)
    measured = measured_memory(profile, model, weights, settings, estimate, accumulation,
                               resumed=resume_from is not None and not profile.restored)
    return {
        **_what_trained(model, trainer, settings, parameters, model_dir),
        "memory": measured,
        "memory_estimate": estimate,
        **_data_summary(dataset, tokenized_dir, tokenization),
        "micro_batch_size": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "checkpoints": str(checkpoints) if saving else None,
        "wandb_run_dir": str(wandb_folder) if wandb_folder is not None else None,
        **_progress(trainer, result, wall, resume_from),
        "provenance": provenance({**settings, "template": template},
                                 {"model": model_dir, "train_split": Path(data_dir) / "train.jsonl"},
                                 dataset_sha256=read_json(Path(data_dir) / "prepare.json")["input_sha256"]),
    }


def _data_summary(dataset, tokenized_dir, tokenization: dict) -> dict:
    return {"train_examples": len(dataset),
            "tokenized_split": str(tokenized_dir) if tokenized_dir is not None else None,
            "tokenization": {"dropped_prompt_too_long": len(tokenization["dropped_prompt_too_long"]),
                             "truncated": tokenization["truncated"]}}


def _what_trained(model, trainer, settings: dict, parameters: tuple[int, int], model_dir) -> dict:
    """train.json's description of the model and the training set-up."""
    trainable, total = parameters
    source = Path(model_dir) / "source.json"
    return {
        "method": settings["method"],
        "parameters": {"trainable": int(trainable), "total": int(total), "trainable_percent": 100 * trainable / total},
        "device": modeling.device(),
        # A random: source (loragrid.fetch) has real memory figures and meaningless quality.
        "model_random_init": bool(source.exists() and read_json(source).get("random_init")),
        "optimizer": optimizer_summary(trainer.optimizer),
        "gradient_checkpointing": model.is_activation_checkpointing,
        "logits_only_where_labelled": isinstance(trainer.data_collator, LabelledLogitsOnly),
        "quantization": modeling.quantization_summary(model),
        "compute_dtype": str(modeling.compute_dtype()).replace("torch.", ""),
        "threads": torch.get_num_threads(),
    }


def _progress(trainer, result, wall: float, resume_from: Path | None) -> dict:
    """train.json's steps, times, throughput and losses."""
    losses = [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]
    tokens = int(trainer.state.num_input_tokens_seen)
    resumed_step = int(CHECKPOINT.match(resume_from.name).group(1)) if resume_from else 0
    # The count goes on from the checkpoint's, the runtime covers only this attempt's steps. The checkpoint itself
    # may be gone (save_total_limit), but the history it restored logs the count at every step.
    at_resume = [entry["num_input_tokens_seen"] for entry in trainer.state.log_history
                 if entry.get("step") == resumed_step and "num_input_tokens_seen" in entry]
    tokens_before = at_resume[-1] if at_resume else tokens * resumed_step / max(trainer.state.global_step, 1)
    return {
        "steps": trainer.state.global_step,
        "resumed_from_step": resumed_step,
        "wall_seconds": wall,
        "train_runtime_seconds": result.metrics["train_runtime"],
        "tokens_seen_non_padding": tokens,
        "tokens_per_second": (tokens - tokens_before) / result.metrics["train_runtime"],
        "final_loss": losses[-1]["loss"] if losses else None,
        "loss_curve": losses,
        "step_seconds": step_seconds(trainer),
    }


def train_to_files(model_dir, data_dir, weights_dir, train_json, settings, template, trust_remote_code=False,
                   **folders) -> dict:
    """Train one run in this process and write its train.json (the first process of several writes).

    `folders` are train's optional keyword arguments (checkpoint_root, tokenized_dir, ...)."""
    summary = train(model_dir, data_dir, weights_dir, settings, template, trust_remote_code, **folders)
    if int(os.environ.get("RANK", 0)) == 0:  # under DDP (loragrid.launch) one process writes
        write_json(train_json, summary)
        if summary["checkpoints"]:
            # Both outputs are in place: the checkpoints have served their purpose, and so has the run's
            # checkpoint folder once nothing else is in it (the experiment's stays: other runs write there).
            shutil.rmtree(summary["checkpoints"], ignore_errors=True)
            with contextlib.suppress(OSError):
                Path(summary["checkpoints"]).parent.rmdir()
    return summary


def train_run(settings: dict, **call) -> dict | None:
    """The training job's entry point: train one run here, or with more than one GPU through
    `accelerate launch` (loragrid.launch), one process per GPU, each calling train_to_files.

    `call` holds train_to_files's other arguments (paths, template, ...).
    """
    gpus = launch.check_gpus(settings)
    if gpus <= 1:
        return train_to_files(settings=settings, **call)
    launch.launch_processes(gpus, {**call, "settings": settings})
    return None
