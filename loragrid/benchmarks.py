"""benchmark: lm-evaluation-harness on the base model and every run (local YAML tasks, offline).

lm-eval's own API does the work (`simple_evaluate`, `TaskManager(include_path=...)`, `HFLM` around
a model that loragrid loaded, so the safetensors-only and manifest checks hold). loragrid adds the
checks that fail before a model loads, a compact summary per model, and its own rolling
log-likelihood to check lm-eval's perplexity numbers against.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import os
import socket
import time
from pathlib import Path

import yaml

from .common import LoragridError, atomic_dir, provenance, read_json, verify_folder, write_json

log = logging.getLogger("loragrid.benchmarks")

# Fields an lm-eval YAML task needs for each output type (lm-eval itself fails late, or scores
# nothing, without them).
COMMON_FIELDS = ("task", "dataset_path", "output_type", "doc_to_target")
FIELDS_BY_OUTPUT_TYPE = {
    "multiple_choice": ("doc_to_text", "doc_to_choice"),
    "loglikelihood": ("doc_to_text",),
    "loglikelihood_rolling": (),
    "generate_until": ("doc_to_text",),
}
# The metric the report shows for a task, by output type (lower is better for perplexity).
HEADLINE = {"multiple_choice": "acc", "loglikelihood": "acc", "loglikelihood_rolling": "word_perplexity"}
HUB_HOST = ("huggingface.co", 443)
# Closed-form standard errors (acc) need no resampling; lm-eval bootstraps others in a process pool.
BOOTSTRAP_ITERS = 100


class _TolerantLoader(yaml.SafeLoader):
    """lm-eval task files may hold `!function module.name` tags; they are kept as text here."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix} {loader.construct_scalar(node)}")


def local_tasks(task_dir) -> dict[str, tuple[Path, dict]]:
    """{task name: (YAML file, its settings)} of every task file in `task_dir` (config key benchmarks.task_dir)."""
    folder = Path(task_dir)
    if not folder.is_dir():
        raise LoragridError(f"config key 'benchmarks.task_dir': no such folder: {task_dir}")
    tasks = {}
    for path in sorted(folder.glob("*.yaml")):
        try:
            settings = yaml.load(path.read_text(encoding="utf-8"), Loader=_TolerantLoader)
        except yaml.YAMLError as error:
            raise LoragridError(f"config key 'benchmarks.task_dir': {path} is not valid YAML: {error}") from None
        if isinstance(settings, dict) and isinstance(settings.get("task"), str):
            tasks[settings["task"]] = (path, settings)
    return tasks


def _data_files(settings: dict) -> list[str]:
    files = (settings.get("dataset_kwargs") or {}).get("data_files") or []
    if isinstance(files, dict):
        files = list(files.values())
    files = files if isinstance(files, list) else [files]
    return [item for entry in files for item in (entry if isinstance(entry, list) else [entry])]


def check_task_file(name: str, path: Path, settings: dict, workdir=".") -> list[str]:
    """Fail on a task file that lacks a field its output type needs; returns its data files."""
    output_type = settings.get("output_type")
    if output_type not in FIELDS_BY_OUTPUT_TYPE:
        raise LoragridError(f"config key 'benchmarks.tasks': task '{name}' ({path}): output_type is {output_type!r}; "
                            f"lm-eval knows {', '.join(FIELDS_BY_OUTPUT_TYPE)}")
    needed = COMMON_FIELDS + FIELDS_BY_OUTPUT_TYPE[output_type]
    for field in needed:
        if settings.get(field) in (None, "") and not (field == "doc_to_text" and "doc_to_text" in settings):
            raise LoragridError(f"config key 'benchmarks.tasks': task '{name}' ({path}) has no '{field}' field; "
                                f"an lm-eval {output_type} task needs {', '.join(needed)} (see "
                                "data/benchmarks/loragrid_sense.yaml for a complete one)")
    if not any(settings.get(key) for key in ("test_split", "validation_split")):
        raise LoragridError(f"config key 'benchmarks.tasks': task '{name}' ({path}) names no split to score "
                            "('test_split' or 'validation_split')")
    files = _data_files(settings)
    for file in files:
        if not (Path(workdir) / file).is_file():
            raise LoragridError(f"config key 'benchmarks.tasks': task '{name}' ({path}) reads {file}, which does not "
                                "exist (data_files are relative to the workflow folder)")
    return files


@functools.lru_cache(maxsize=2)
def hub_reachable(offline: bool = False) -> bool:
    """Whether lm-eval can download a standard task's dataset: not offline, and huggingface.co answers."""
    if offline or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(HUB_HOST, timeout=3).close()
        return True
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def builtin_task_names() -> tuple[str, ...]:
    """lm-eval's own tasks, groups and tags (indexing its ~15,000 task files takes about 5 s, once)."""
    from lm_eval.tasks import TaskManager

    return tuple(TaskManager().all_tasks)


def _standard_task(name: str, local: dict, offline: bool) -> None:
    """A task that is not in benchmarks.task_dir: lm-eval's own (its data on the hub), or unknown."""
    known = builtin_task_names()
    if name not in known:
        close = difflib.get_close_matches(name, [*local, *known], n=3)
        raise LoragridError(f"config key 'benchmarks.tasks': no task '{name}' in benchmarks.task_dir or in lm-eval "
                            f"(local tasks: {', '.join(local) or 'none'}"
                            + (f"; did you mean {', '.join(close)}?)" if close else ")"))
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or hub_reachable(offline):
        return
    raise LoragridError(
        f"config key 'benchmarks.tasks': '{name}' is lm-eval's task on a Hugging Face hub dataset, and the hub "
        f"({HUB_HOST[0]}) cannot be reached from here; run it where the hub is reachable, or with its dataset "
        "already in the Hugging Face cache and HF_DATASETS_OFFLINE=1, or use the local tasks "
        f"({', '.join(local)}), which need no network")


def check_benchmarks(settings: dict, workdir=".", offline: bool = False) -> list[str]:
    """Every check of config key `benchmarks` that needs no model; returns the local files the tasks read.

    Runs at workflow start, so that a bad task name or task file fails before any model loads.
    """
    tasks = settings["tasks"]
    if not tasks:
        return []
    local = local_tasks(Path(workdir) / settings["task_dir"])
    files = []
    for name in tasks:
        if name in local:
            path, task = local[name]
            files += [str(Path(settings["task_dir"]) / path.name), *check_task_file(name, path, task, workdir)]
        else:
            _standard_task(name, local, offline)
    limit = settings["limit"]
    for name in limit if isinstance(limit, dict) else []:
        if name not in tasks and name not in local:  # a limit of a local task that is not run is harmless
            raise LoragridError(f"config key 'benchmarks.limit.{name}': no task '{name}' in benchmarks.tasks "
                                f"({', '.join(tasks)}) or in benchmarks.task_dir")
    return files


def task_files(settings: dict, workdir=".") -> list[str]:
    """The task files and data files of the local tasks named in config key benchmarks.tasks (checked or not)."""
    if not settings["tasks"] or not (Path(workdir) / settings["task_dir"]).is_dir():
        return []
    local = local_tasks(Path(workdir) / settings["task_dir"])
    return sorted({file for name in settings["tasks"] if name in local
                   for file in (str(Path(settings["task_dir"]) / local[name][0].name), *_data_files(local[name][1]))})


def task_limit(limit, name: str) -> int | None:
    """Documents scored of task `name`: config key benchmarks.limit (a number for all tasks, or per task)."""
    return limit.get(name) if isinstance(limit, dict) else limit


def model_max_length(model_dir) -> int | None:
    """The longest input the model's config.json allows (None where it names no limit)."""
    config = read_json(Path(model_dir) / "config.json") if (Path(model_dir) / "config.json").is_file() else {}
    config = config.get("text_config") or config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if config.get(key):
            return int(config[key])
    return None


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_fit(model_dir, max_length: int | None, batch_size: int) -> int:
    """The window length to score with; fails (naming the key) where the model cannot take it.

    Memory: lm-eval takes the log-softmax of a batch's full logits in fp32 (batch x length x
    vocabulary, twice), beside the fp32 weights (counted as twice their size on disk: bf16 files
    double); where that exceeds the available memory the job would be killed half-way, so it
    fails here instead.
    """
    longest = model_max_length(model_dir)
    if max_length is None:
        max_length = longest or 2048  # lm-eval's own default where a config names none
    elif longest and max_length > longest:
        raise LoragridError(f"config key 'benchmarks.max_length': {max_length} tokens, but the model in {model_dir} "
                            f"takes at most {longest} (its config.json); set benchmarks.max_length to {longest} "
                            "or less")
    config = read_json(Path(model_dir) / "config.json") if (Path(model_dir) / "config.json").is_file() else {}
    weights = sum(path.stat().st_size for path in Path(model_dir).glob("*.safetensors"))
    logits = 2 * batch_size * max_length * int(config.get("vocab_size") or 0) * 4
    available = available_memory_bytes()
    if available and 2 * weights + logits > available:
        raise LoragridError(
            f"config key 'benchmarks.batch_size': {batch_size} windows of {max_length} tokens need about "
            f"{(2 * weights + logits) / 1e9:.1f} GB (the weights in fp32 and the logits' log-softmax), "
            f"{available / 1e9:.1f} GB is available; lower benchmarks.batch_size or benchmarks.max_length")
    return max_length


def rolling_token_windows(length: int, max_length: int) -> list[tuple[int, int]]:
    """(first, end) of the tokens each window predicts: lm-eval's rolling windows (context_len 1).

    Disjoint windows of `max_length` predicted tokens; a window's input is the `max_length` tokens
    before its last predicted one (the first window starts with the prefix token), so only the
    last, shorter window sees context from the window before.
    """
    return [(first, min(first + max_length, length)) for first in range(0, length, max_length)]


def rolling_loglikelihood(model, tokenizer, text: str, max_length: int) -> tuple[float, int]:
    """(sum of log p(token | tokens before it), token count) of `text` with plain transformers.

    loragrid's own computation, to check lm-eval's: the same tokenization (the tokenizer's
    default special tokens), the same prefix token (BOS, else EOS) and the same windows.
    """
    import torch

    tokens = tokenizer.encode(text)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    sequence = [prefix, *tokens]  # sequence[i] predicts tokens[i]
    total = 0.0
    with torch.no_grad():
        for first, end in rolling_token_windows(len(tokens), max_length):
            start = max(0, end - max_length)
            inputs = torch.tensor([sequence[start:end]], device=model.device)
            logits = model(input_ids=inputs).logits[0, first - start:].float()
            targets = torch.tensor(tokens[first:end], device=model.device)
            total += torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum().item()
    return total, len(tokens)


def _jsonable(value):
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(value, default=handle_non_serializable))


def task_summary(name: str, task, metrics: dict, samples: list[dict], lm) -> dict:
    """A task's scores, without lm-eval's ',none' filter suffixes; rolling tasks add token-level figures."""
    output_type = task.config.output_type
    values = {key.split(",")[0]: value for key, value in metrics.items()
              if "," in key and isinstance(value, (int, float))}
    summary = {"output_type": output_type, "documents": len(samples), **values}
    if output_type == "loglikelihood_rolling":
        loglikelihood = sum(float(sample["filtered_resps"][0]) for sample in samples)
        tokens = sum(len(lm.tok_encode(task.doc_to_target(sample["doc"]))) for sample in samples)
        summary.update(token_loglikelihood=loglikelihood, tokens=tokens,
                       token_perplexity=math.exp(-loglikelihood / tokens), max_length=lm.max_length)
    headline = HEADLINE.get(output_type)
    summary["headline"] = headline if headline in summary else next(iter(values), None)
    return summary


def _selected_documents(loaded: dict, limit) -> dict[str, list[int]] | None:
    """lm-eval's `samples`: the first benchmarks.limit documents of each limited task."""
    chosen = {}
    for name, task in loaded["tasks"].items():
        count = task_limit(limit, name)
        if count is not None:
            chosen[name] = list(range(min(count, len(task.eval_docs))))
    return chosen or None


def _evaluate(model_dir, settings: dict, max_length: int, local: bool, trust_remote_code: bool):
    """lm-eval's simple_evaluate on the model as loragrid loads it: (results, loaded tasks, HFLM)."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from . import modeling
    from .tokenized import load_tokenizer

    # Only the built-in index (some 15,000 task files, about 5 s) when a standard task is named.
    manager = TaskManager(include_path=str(settings["task_dir"]), include_defaults=not local)
    loaded = manager.load(settings["tasks"])
    model = modeling.load_for_inference(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    lm = HFLM(pretrained=model, tokenizer=load_tokenizer(model_dir, trust_remote_code),
              batch_size=settings["batch_size"], max_length=max_length)
    results = simple_evaluate(
        model=lm, tasks=list(loaded["tasks"].values()), task_manager=manager,
        samples=_selected_documents(loaded, settings["limit"]), bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    return results, loaded, lm


def run_benchmarks(model_dir, out_dir, settings: dict, trust_remote_code: bool = False) -> dict:
    """Benchmark one model: lm-eval's results.json and samples, and loragrid's summary.json, in `out_dir`."""
    verify_folder(model_dir)
    local = set(settings["tasks"]) <= set(local_tasks(settings["task_dir"]))
    files = check_benchmarks(settings)
    max_length = check_fit(model_dir, settings["max_length"], settings["batch_size"])
    if local:  # the local tasks read local files only; nothing waits for a hub that cannot answer
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    results, loaded, lm = _evaluate(model_dir, settings, max_length, local, trust_remote_code)
    samples = results.pop("samples")
    summary = {
        "tasks": {name: task_summary(name, task, results["results"][name], samples[name], lm)
                  for name, task in loaded["tasks"].items()},
        "max_length": max_length,
        "seconds": time.perf_counter() - started,
        "lm_eval_version": results.get("lm_eval_version"),
        "provenance": provenance(settings, {"model": model_dir, **{file: file for file in files}}),
    }
    with atomic_dir(out_dir) as staging:
        write_json(staging / "results.json", _jsonable(results))
        for name, records in samples.items():
            with open(staging / f"samples_{name}.jsonl", "w", encoding="utf-8") as handle:
                for record in _jsonable(records):
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        write_json(staging / "summary.json", summary)
    for name, task in summary["tasks"].items():
        log.info("%s: %s %.4g over %d documents", name, task["headline"], task[task["headline"]], task["documents"])
    return summary
