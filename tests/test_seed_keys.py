"""The keys that configs written after the seed tutorials use: target_modules: null, warmup_steps,
report_to: wandb (the real library, offline), and beam search with no_repeat_ngram_size.

Each is tested where it reaches its library, then all of them once through a real snakemake run.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from conftest import TINY_RUN, results_dir, snakemake, tiny_config, with_fetched_model
from loragrid import modeling
from loragrid.common import read_json, read_jsonl
from loragrid.generate import generate, generation_config
from loragrid.templates import conversation_token_ids
from loragrid.tokenized import load_tokenizer
from loragrid.train import train_to_files, warmup

ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    """No WANDB_MODE of the caller's (loragrid's own offline default is under test), quiet, and
    wandb's config, cache and data folders inside the test's folder, not the home directory."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    for variable, value in {"WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false",
                            "WANDB_DISABLE_CODE": "true"}.items():
        monkeypatch.setenv(variable, value)
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / variable.lower()))


def wandb_records(path: Path) -> list:
    """Every record of a .wandb file, decoded with wandb's own protobuf `Record`.

    wandb 0.31 ships no Python reader (its Go core writes and syncs the file), so the framing is
    read here: LevelDB's log format, a ':W&B' header, then 32 KiB blocks of records, each
    crc32 (of type and data), length, type (1 whole, 2 first, 3 middle, 4 last part) and data.
    """
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]
    records, pending, offset = [], b"", 7
    while offset + 7 <= len(data):
        if 32768 - offset % 32768 < 7:  # a block's tail too short for a header is padding
            offset += 32768 - offset % 32768
            continue
        checksum, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        chunk = data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind == 0:
            continue
        assert checksum == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f"{path}: bad checksum at {offset}"
        pending += chunk
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(records) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in records if record.HasField("history")]


def wandb_run_file(run_dir: Path) -> Path:
    assert run_dir.name.startswith("offline-run-") and run_dir.parent.name == "wandb", run_dir
    files = list(run_dir.glob("run-*.wandb"))
    assert len(files) == 1, list(run_dir.iterdir())
    return files[0]


def adapted_modules(model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def test_target_modules_null_adapts_every_linear_layer_like_all_linear(tiny_model_dir):
    adapted = {}
    for targets in (None, "all-linear"):
        model = modeling.add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                  {**TINY_RUN, "target_modules": targets})
        adapted[targets] = (adapted_modules(model), model.peft_config["default"].target_modules)
    assert adapted[None] == adapted["all-linear"]
    # Not peft's own reading of None (q_proj and v_proj for Llama): every linear layer but the head.
    assert {name.rpartition(".")[2] for name in adapted[None][0]} == ALL_LINEAR


def test_warmup_steps_are_steps_and_without_them_the_ratio_applies(tmp_path):
    def warmup_steps(settings):
        return TrainingArguments(output_dir=str(tmp_path), warmup_steps=warmup(settings)).get_warmup_steps(100)

    ratio = {**TINY_RUN, "warmup_ratio": 0.05}
    older = {key: value for key, value in ratio.items() if key != "warmup_steps"}
    assert warmup_steps(older) == 5  # settings from before the key existed
    assert warmup_steps({**ratio, "warmup_steps": None}) == 5
    assert warmup_steps({**ratio, "warmup_steps": 2}) == 2
    assert warmup_steps({**ratio, "warmup_steps": 1}) == 1  # an integer 1 is one step, not the whole run
    assert warmup_steps({**TINY_RUN, "warmup_steps": 0}) == 0


@pytest.mark.parametrize("scheduler, expected", [
    # The rate logged at a step is the one it used: 0, then half, then the full rate.
    ("constant_with_warmup", [0.0, 0.5, 1.0]),
    ("linear", [0.0, 0.5, 1.0]),
])
def test_warmup_steps_warm_the_learning_rate_up_over_that_many_steps(tiny_model_dir, prepared_dir, tmp_path,
                                                                     scheduler, expected):
    settings = {**TINY_RUN, "warmup_steps": 2, "lr_scheduler_type": scheduler, "max_steps": 3}
    train_to_files(tiny_model_dir, prepared_dir, tmp_path / "w", tmp_path / "t.json", settings, "chat")
    state = read_json(tmp_path / "w" / "trainer_state.json")
    rates = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    assert rates == pytest.approx([share * TINY_RUN["learning_rate"] for share in expected])


def test_report_to_wandb_leaves_an_offline_run_with_the_logged_metrics(tiny_model_dir, prepared_dir, tmp_path,
                                                                       wandb_offline):
    settings = {**TINY_RUN, "report_to": "wandb"}
    summary = train_to_files(tiny_model_dir, prepared_dir, tmp_path / "w", tmp_path / "t.json", settings, "chat",
                             wandb_dir=tmp_path / "wb", run_name="tiny-run")
    run_dir = Path(summary["wandb_run_dir"])
    assert run_dir.parent.parent == tmp_path / "wb"
    records = wandb_records(wandb_run_file(run_dir))
    run = next(r.run for r in records if r.HasField("run"))
    assert (run.display_name, run.project) == ("tiny-run", "loragrid")
    history = [step for step in wandb_history(records) if "train/loss" in step]
    assert [step["train/loss"] for step in history] == pytest.approx([p["loss"] for p in summary["loss_curve"]])
    assert [step["train/global_step"] for step in history] == [1, 2, 3]
    assert all(step["train/learning_rate"] == TINY_RUN["learning_rate"] for step in history)
    # wandb.finish() ran: the run ends with its exit record, not cut off at the process's exit.
    assert [r.exit.exit_code for r in records if r.HasField("exit")] == [0]


def test_report_to_wandb_respects_the_users_wandb_mode(tiny_model_dir, prepared_dir, tmp_path, wandb_offline,
                                                       monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    summary = train_to_files(tiny_model_dir, prepared_dir, tmp_path / "w", tmp_path / "t.json",
                             {**TINY_RUN, "report_to": "wandb"}, "chat", wandb_dir=tmp_path / "wb")
    assert summary["wandb_run_dir"] is None and summary["steps"] == TINY_RUN["max_steps"]
    assert not list((tmp_path / "wb").rglob("*.wandb"))


GENERATE = {"max_new_tokens": 12, "batch_size": 8, "do_sample": False, "temperature": 0.7, "top_p": 0.9,
            "repetition_penalty": 1.0, "num_beams": 1, "no_repeat_ngram_size": 0, "seed": 0}


@pytest.mark.parametrize("changes, expected", [
    ({"num_beams": 2, "no_repeat_ngram_size": 3, "repetition_penalty": 1.2},
     {"num_beams": 2, "no_repeat_ngram_size": 3, "repetition_penalty": 1.2, "do_sample": False}),
    ({"do_sample": True, "num_beams": 3},
     {"num_beams": 3, "do_sample": True, "temperature": 0.7, "top_p": 0.9}),
])
def test_generation_config_maps_each_key(tiny_model_dir, changes, expected):
    config = generation_config(load_tokenizer(tiny_model_dir), {**GENERATE, **changes})
    assert {key: getattr(config, key) for key in expected} == expected
    if not config.do_sample:  # sampling settings only where they sample
        assert not {"temperature", "top_p"} & set(config.to_diff_dict())


def test_generation_settings_from_before_the_beam_keys_still_load(tiny_model_dir):
    older = {key: value for key, value in GENERATE.items() if key not in ("num_beams", "no_repeat_ngram_size")}
    config = generation_config(load_tokenizer(tiny_model_dir), older)
    assert (config.num_beams, config.no_repeat_ngram_size) == (1, 0)


def repeated_bigrams(tokens: list[int]) -> int:
    bigrams = list(zip(tokens, tokens[1:]))
    return len(bigrams) - len(set(bigrams))


def answer_tokens(model, tokenizer, prompts, settings) -> list[list[int]]:
    """As loragrid.generate.generate asks: left-padded batches of `batch_size`, cut at the first EOS."""
    config = generation_config(tokenizer, settings)
    answers = []
    for start in range(0, len(prompts), settings["batch_size"]):
        batch = tokenizer.pad([{"input_ids": p} for p in prompts[start:start + settings["batch_size"]]],
                              return_tensors="pt")
        output = model.generate(**batch, generation_config=config)
        for row in output[:, batch["input_ids"].shape[1]:].tolist():
            answers.append(row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row)
    return answers


def test_beam_search_with_no_repeat_ngram_size_on_left_padded_batches(tiny_model_dir, prepared_dir):
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    # fp32: beams of a random model are near ties, which bf16 rounding may break differently per batch.
    model = modeling.load_for_inference(tiny_model_dir, dtype=torch.float32)
    heldout = read_jsonl(prepared_dir / "heldout.jsonl")
    prompts = [conversation_token_ids(tokenizer, "chat", record["messages"][:-1]) for record in heldout]
    assert len({len(p) for p in prompts}) > 1  # the batches are padded
    beams = {**GENERATE, "num_beams": 2, "no_repeat_ngram_size": 2}
    batched = answer_tokens(model, tokenizer, prompts, beams)
    assert all(answer for answer in batched)
    assert [repeated_bigrams(answer) for answer in batched] == [0] * len(prompts)
    assert batched == answer_tokens(model, tokenizer, prompts, {**beams, "batch_size": 1})
    # The random model repeats itself when allowed to, so the check above means something.
    unconstrained = answer_tokens(model, tokenizer, prompts, {**beams, "no_repeat_ngram_size": 0})
    assert any(repeated_bigrams(answer) for answer in unconstrained)


def test_generate_with_beams_answers_alike_in_left_padded_batches_and_alone(tiny_model_dir, prepared_dir, tmp_path):
    beams = {**GENERATE, "num_beams": 2, "no_repeat_ngram_size": 2}
    answers = {}
    for batch_size in (8, 1):
        meta = generate(tiny_model_dir, prepared_dir / "heldout.jsonl", tmp_path / f"{batch_size}.jsonl",
                        tmp_path / f"{batch_size}.json", "chat", {**beams, "batch_size": batch_size})
        assert meta["settings"]["num_beams"] == 2 and meta["settings"]["no_repeat_ngram_size"] == 2
        answers[batch_size] = [a["answer"] for a in read_jsonl(tmp_path / f"{batch_size}.jsonl")]
    assert answers[8] == answers[1] and all(answers[1])


def test_seed_keys_reach_their_jobs_through_snakemake(copy_repo, tiny_model_dir, fetched_tiny_model, wandb_offline):
    """One real snakemake run: Snakemake's config merging and params carry every new key to its job."""
    # max_memory_gb: room for any micro-batch, so the largest divisor of batch_size 8 replaces micro_batch_size 2.
    training = {"max_steps": 2, "micro_batch_size": 2, "max_memory_gb": 1000, "lora_r": 4, "lora_alpha": 8,
                "cutoff_len": 96, "target_modules": None, "warmup_steps": 1, "report_to": "wandb",
                "lr_scheduler_type": "constant_with_warmup"}
    generate = {"max_new_tokens": 4, "batch_size": 8, "num_beams": 2, "no_repeat_ngram_size": 2,
                "repetition_penalty": 1.2}
    # torch_threads reaches the jobs from the config, not a param (a change re-runs nothing: test_workflow.py).
    config = tiny_config(copy_repo, tiny_model_dir, training=training, generate=generate, grid={"method": ["lora"]},
                         torch_threads=2)
    with_fetched_model(copy_repo, fetched_tiny_model)
    results = results_dir(copy_repo)
    targets = [results / "runs/lora/train.json", results / "generations/base.json"]
    outcome = snakemake(copy_repo, *(str(t.relative_to(copy_repo)) for t in targets), "--configfile", str(config))
    assert outcome.returncode == 0, outcome.stdout[-3000:] + outcome.stderr[-3000:]

    summary = read_json(results / "runs/lora/train.json")
    assert summary["threads"] == 2  # the tests' OMP_NUM_THREADS is 1
    settings = summary["provenance"]["settings"]
    assert (settings["warmup_steps"], settings["report_to"]) == (1, "wandb")
    chosen = (settings["max_memory_gb"], summary["micro_batch_size"], summary["gradient_accumulation_steps"])
    assert chosen == (1000, 8, 1)
    adapter = results / "runs/lora/adapter"
    targets = read_json(adapter / "adapter_config.json")["target_modules"]
    assert {name.rpartition(".")[2] for name in targets} == ALL_LINEAR
    state = read_json(adapter / "trainer_state.json")
    rates = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    assert rates == pytest.approx([0.0, settings["learning_rate"]])  # one warm-up step, the ratio turned off
    run_dir = copy_repo / summary["wandb_run_dir"]
    assert run_dir.is_relative_to(results / "wandb/lora")  # the rule's own folder for it
    records = wandb_records(wandb_run_file(run_dir))
    [run] = [record.run for record in records if record.HasField("run")]
    assert run.display_name == "lora"
    logged = [step["train/loss"] for step in wandb_history(records) if "train/loss" in step]
    assert logged == pytest.approx([point["loss"] for point in summary["loss_curve"]])

    generated = read_json(results / "generations/base.json")["settings"]
    assert {key: generated[key] for key in generate} == generate
    assert len(read_jsonl(results / "generations/base.jsonl")) == 8

    # Sampling, set on the command line: Snakemake re-runs generation with the new params.
    sampling = "generate={do_sample: true, temperature: 0.7, top_p: 0.9}"
    generations = (results / "generations/base.json").relative_to(copy_repo)
    outcome = snakemake(copy_repo, str(generations), "--configfile", str(config), "--config", sampling)
    assert outcome.returncode == 0, outcome.stdout[-3000:] + outcome.stderr[-3000:]
    generated = read_json(results / "generations/base.json")["settings"]
    assert (generated["do_sample"], generated["temperature"], generated["top_p"]) == (True, 0.7, 0.9)
    assert generated["num_beams"] == 2  # the file's other generate keys still hold
    assert len(read_jsonl(results / "generations/base.jsonl")) == 8
