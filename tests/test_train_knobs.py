"""Every training knob of the schema, on the tiny model: each one reaches the library and shows its effect."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import REPO, TINY_RUN
from loragrid import estimate, modeling, tokenized
from loragrid import train as training
from loragrid.common import LoragridError, read_json, read_jsonl
from loragrid.train import train, train_to_files


def run(tiny_model_dir, prepared_dir, tmp_path, name="run", **changes):
    settings = {**TINY_RUN, **changes}
    return train_to_files(tiny_model_dir, prepared_dir, tmp_path / name, tmp_path / f"{name}.json", settings, "chat")


def learning_rates(summary_dir):
    state = read_json(summary_dir / "trainer_state.json")
    return [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]


def test_every_training_key_has_a_schema_default():
    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())
    run_keys = set(schema["$defs"]["run"]["properties"])
    defaults = schema["properties"]["training"]["properties"]
    assert run_keys == set(defaults) == set(TINY_RUN)
    assert all("default" in defaults[key] for key in run_keys)
    assert set(schema["properties"]["grid"]["propertyNames"]["enum"]) == run_keys | {"_"}


def test_new_keys_at_their_defaults_keep_run_names():
    from loragrid.config import resolve_runs

    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())
    defaults = {key: spec["default"] for key, spec in schema["properties"]["training"]["properties"].items()}
    config = {"training": defaults, "methods": {}, "grid": {"method": ["full", "lora", "qlora4"]}, "runs": {}}
    assert list(resolve_runs(config)) == ["full", "lora", "qlora4"]
    config["grid"]["optimizer"] = [defaults["optimizer"], "adamw_bnb_8bit"]
    config["grid"]["bnb_4bit_quant_type"] = ["nf4", "fp4"]
    names = set(resolve_runs(config))
    assert names == {"full", "lora", "qlora4", "full-optadamw_bnb_8bit", "lora-optadamw_bnb_8bit",
                     "qlora4-optadamw_bnb_8bit", "qlora4-qfp4", "qlora4-optadamw_bnb_8bit-qfp4"}


def test_batch_size_over_micro_batch_is_the_accumulation_and_one_epoch_sees_every_token(
        tiny_model_dir, prepared_dir, tmp_path):
    summary = run(tiny_model_dir, prepared_dir, tmp_path, batch_size=8, micro_batch_size=4, max_steps=-1, epochs=1)
    examples = summary["train_examples"]
    assert summary["gradient_accumulation_steps"] == 2 and summary["micro_batch_size"] == 4
    assert summary["steps"] == math.ceil(math.ceil(examples / 4) / 2)
    dataset, _ = tokenized.build_dataset(tokenized.load_tokenizer(tiny_model_dir), "chat", prepared_dir, TINY_RUN)
    assert summary["tokens_seen_non_padding"] == sum(dataset["length"])


def test_epochs_multiply_the_steps(tiny_model_dir, prepared_dir, tmp_path):
    one = run(tiny_model_dir, prepared_dir, tmp_path, "one", batch_size=16, micro_batch_size=16, max_steps=-1,
              epochs=1)
    two = run(tiny_model_dir, prepared_dir, tmp_path, "two", batch_size=16, micro_batch_size=16, max_steps=-1,
              epochs=2)
    assert two["steps"] == 2 * one["steps"]
    assert two["tokens_seen_non_padding"] == 2 * one["tokens_seen_non_padding"]


def test_a_split_smaller_than_a_batch_is_said_in_the_log(tiny_model_dir, prepared_dir, tmp_path, caplog):
    examples = len(read_jsonl(prepared_dir / "train.jsonl"))
    with caplog.at_level("WARNING", logger="loragrid.train"):
        run(tiny_model_dir, prepared_dir, tmp_path, batch_size=64, micro_batch_size=64, max_steps=1)
    assert f"the training split has {examples} examples, fewer than batch_size 64" in caplog.text


def test_batch_size_not_a_multiple_fails_before_training(tiny_model_dir, prepared_dir, tmp_path):
    with pytest.raises(LoragridError, match="batch_size.*micro_batch_size"):
        run(tiny_model_dir, prepared_dir, tmp_path, batch_size=6, micro_batch_size=4)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.json").exists()


@pytest.mark.parametrize("scheduler, warmup, check", [
    ("constant", 0.0, lambda lrs: len(set(lrs)) == 1),
    # The learning rate logged at a step is the one that step used: warmup starts from 0.
    ("constant_with_warmup", 0.5, lambda lrs: lrs[0] < lrs[1] < lrs[2] == lrs[3]),
    ("linear", 0.25, lambda lrs: lrs[0] < lrs[1] and lrs[1:] == sorted(lrs[1:], reverse=True) and lrs[3] < lrs[1]),
    ("cosine", 0.5, lambda lrs: lrs[0] < lrs[1] < lrs[2] > lrs[3]),
])
def test_scheduler_and_warmup_shape_the_learning_rate(tiny_model_dir, prepared_dir, tmp_path, scheduler, warmup,
                                                      check):
    run(tiny_model_dir, prepared_dir, tmp_path, lr_scheduler_type=scheduler, warmup_ratio=warmup, max_steps=4)
    lrs = learning_rates(tmp_path / "run")
    assert len(lrs) == 4 and max(lrs) <= TINY_RUN["learning_rate"]
    assert check(lrs), lrs


def micro_batches(tiny_model_dir, prepared_dir, tmp_path, **changes):
    """The micro-batches the Trainer of these settings feeds the model in one epoch."""
    settings = {**TINY_RUN, **changes}
    tokenizer = tokenized.load_tokenizer(tiny_model_dir)
    dataset, _ = tokenized.build_dataset(tokenizer, "chat", prepared_dir, settings)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = training.make_trainer(model, tokenizer, dataset, settings, settings["micro_batch_size"],
                                    tmp_path, saving=False)
    return list(trainer.get_train_dataloader())


def padding_share(batches):
    return (sum((b["attention_mask"] == 0).sum().item() for b in batches)
            / sum(b["attention_mask"].numel() for b in batches))


def test_group_by_length_cuts_padding(tiny_model_dir, prepared_dir, tmp_path):
    # cutoff_len 512 keeps every example whole, so that lengths differ.
    grouped = padding_share(micro_batches(tiny_model_dir, prepared_dir, tmp_path, group_by_length=True,
                                          cutoff_len=512))
    shuffled = padding_share(micro_batches(tiny_model_dir, prepared_dir, tmp_path, group_by_length=False,
                                           cutoff_len=512))
    assert grouped < shuffled / 2, (grouped, shuffled)


def test_packing_gives_one_padding_free_row_per_micro_batch(tiny_model_dir, prepared_dir, tmp_path):
    batches = micro_batches(tiny_model_dir, prepared_dir, tmp_path, packing=True)
    first = batches[0]
    assert first["input_ids"].shape[0] == 1 and "attention_mask" not in first
    starts = (first["position_ids"][0] == 0).sum().item()
    assert starts == TINY_RUN["micro_batch_size"]
    summary = run(tiny_model_dir, prepared_dir, tmp_path, packing=True, max_steps=-1, epochs=1)
    assert all(math.isfinite(p["loss"]) for p in summary["loss_curve"])
    # Every token counts towards tokens/s, those equal to the pad token (EOS ends each answer) too.
    dataset, _ = tokenized.build_dataset(tokenized.load_tokenizer(tiny_model_dir), "chat", prepared_dir, TINY_RUN)
    assert summary["tokens_seen_non_padding"] == sum(dataset["length"])


def test_packed_examples_do_not_see_each_other(tiny_model_dir, prepared_dir, tmp_path):
    """A packed row's logits equal those of each example run alone: the mask is block-diagonal."""
    batch = micro_batches(tiny_model_dir, prepared_dir, tmp_path, packing=True)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        # use_cache=False as in training (the Trainer sets it): with a cache transformers assumes generation.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        for start, end in zip(starts, starts[1:]):
            alone = model(input_ids=batch["input_ids"][:, start:end]).logits[0]
            torch.testing.assert_close(packed[start:end], alone, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_is_applied_and_trains(tiny_model_dir, prepared_dir, tmp_path):
    with_checkpointing = run(tiny_model_dir, prepared_dir, tmp_path, "gc", gradient_checkpointing=True)
    without = run(tiny_model_dir, prepared_dir, tmp_path, "plain", gradient_checkpointing=False)
    assert with_checkpointing["gradient_checkpointing"] and not without["gradient_checkpointing"]
    assert (with_checkpointing["memory_estimate"]["breakdown"]["activations"]
            < without["memory_estimate"]["breakdown"]["activations"])
    assert (with_checkpointing["memory"]["breakdown"]["activations"]
            < without["memory"]["breakdown"]["activations"])
    # Recomputing the forward pass changes nothing but the time.
    for a, b in zip(with_checkpointing["loss_curve"], without["loss_curve"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)


@pytest.mark.parametrize("optimizer, expected", [
    ("adamw_torch", ("torch.optim.adamw.AdamW", 32, False)),
    ("adamw_torch_fused", ("torch.optim.adamw.AdamW", 32, False)),
    ("adamw_bnb_8bit", ("bitsandbytes.optim.adamw.AdamW", 8, False)),
    # bitsandbytes pages the state of parameters on a GPU only (on a CPU it warns and keeps it unpaged).
    ("paged_adamw_8bit", ("bitsandbytes.optim.adamw.AdamW", 8, torch.cuda.is_available())),
])
def test_optimizer_and_weight_decay(tiny_model_dir, prepared_dir, tmp_path, optimizer, expected):
    summary = run(tiny_model_dir, prepared_dir, tmp_path, optimizer=optimizer, weight_decay=0.1)
    built = summary["optimizer"]
    assert (built["class"], built["state_bits"], built["paged"]) == expected
    assert built["weight_decay"] == 0.1
    assert summary["steps"] == TINY_RUN["max_steps"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a device that this machine lacks")
def test_8bit_optimizer_where_it_cannot_run_is_a_clear_error():
    with pytest.raises(LoragridError, match="config key 'optimizer': adamw_bnb_8bit does not run on cuda"):
        training.check_optimizer("adamw_bnb_8bit", "cuda")


def test_different_seeds_give_different_adapters(tiny_model_dir, prepared_dir, tmp_path):
    run(tiny_model_dir, prepared_dir, tmp_path, "a", seed=1)
    run(tiny_model_dir, prepared_dir, tmp_path, "b", seed=2)
    assert ((tmp_path / "a/adapter_model.safetensors").read_bytes()
            != (tmp_path / "b/adapter_model.safetensors").read_bytes())


def test_save_steps_and_save_total_limit(tiny_model_dir, prepared_dir, tmp_path):
    settings = {**TINY_RUN, "max_steps": 4, "save_steps": 1, "save_total_limit": 2}
    summary = train(tiny_model_dir, prepared_dir, tmp_path / "w", settings, "chat", checkpoint_root=tmp_path / "ckpt")
    folder = tmp_path / "ckpt" / next(p.name for p in (tmp_path / "ckpt").iterdir())
    assert summary["checkpoints"] == str(folder)
    assert sorted(p.name for p in folder.iterdir()
                  if p.name.startswith("checkpoint-")) == ["checkpoint-3", "checkpoint-4"]
    assert read_json(folder / "checkpoint-4/trainer_state.json")["global_step"] == 4


def test_without_save_steps_no_checkpoint_is_written(tiny_model_dir, prepared_dir, tmp_path):
    settings = {**TINY_RUN, "save_steps": 0}
    summary = train(tiny_model_dir, prepared_dir, tmp_path / "w", settings, "chat", checkpoint_root=tmp_path / "ckpt")
    assert summary["checkpoints"] is None
    assert not any((tmp_path / "ckpt").rglob("checkpoint-*"))


@pytest.fixture(scope="module")
def tiny_model_with_biases(tiny_model_dir, tmp_path_factory):
    from transformers import AutoConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-bias")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.attention_bias = config.mlp_bias = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def test_lora_bias(tiny_model_with_biases, prepared_dir, tmp_path):
    plain = run(tiny_model_with_biases, prepared_dir, tmp_path, "none", lora_bias="none")
    biased = run(tiny_model_with_biases, prepared_dir, tmp_path, "all", lora_bias="all")
    assert biased["parameters"]["trainable"] > plain["parameters"]["trainable"]
    with safe_open(tmp_path / "all/adapter_model.safetensors", "pt") as handle:
        assert any(key.endswith(".bias") for key in handle.keys())
    assert json.loads((tmp_path / "all/adapter_config.json").read_text())["bias"] == "all"


def test_use_rslora_scales_by_the_square_root_of_r(tiny_model_dir, prepared_dir, tmp_path):
    run(tiny_model_dir, prepared_dir, tmp_path, use_rslora=True)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "run")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(TINY_RUN["lora_alpha"] / math.sqrt(TINY_RUN["lora_r"]))


def test_use_dora_trains_magnitude_vectors_and_the_estimate_counts_what_it_keeps(tiny_model_dir, prepared_dir,
                                                                                 tmp_path):
    """DoRA keeps each adapted layer's base and adapter outputs for its magnitude's gradient: the estimate
    was 0.75 of the measurement without them (docs/memory.md)."""
    plain = run(tiny_model_dir, prepared_dir, tmp_path, "lora")
    dora = run(tiny_model_dir, prepared_dir, tmp_path, "dora", use_dora=True)
    assert dora["parameters"]["trainable"] > plain["parameters"]["trainable"]
    with safe_open(tmp_path / "dora/adapter_model.safetensors", "pt") as handle:
        assert any("lora_magnitude_vector" in key for key in handle.keys())
    sizes = estimate.model_sizes(read_json(tiny_model_dir / "config.json"))
    assert estimate.lora_parameters(sizes, {**TINY_RUN, "use_dora": True}) == dora["parameters"]["trainable"]
    measured, estimated = dora["memory"], dora["memory_estimate"]["at_measured_step"]
    assert measured["breakdown"]["activations"] > 1.2 * plain["memory"]["breakdown"]["activations"]
    assert 0.97 < estimated["total_bytes"] / measured["training_peak_bytes"] < 1.03


@pytest.mark.parametrize("method", ["lora", "qlora4"])
def test_frozen_layers_keep_no_inputs_and_the_estimate_knows(tiny_model_dir, prepared_dir, tmp_path, method):
    """Adapters on q and v only (peft's classic choice): o_proj, the MLP and down_proj stay frozen and keep
    no inputs for a weight gradient. The estimate counted every linear layer's input: 1.09 of the
    measurement at a 4-layer Llama (bench shape), 1.00 now (docs/memory.md)."""
    summary = run(tiny_model_dir, prepared_dir, tmp_path, method=method, target_modules=["q_proj", "v_proj"],
                  gradient_checkpointing=False, micro_batch_size=4, batch_size=4, cutoff_len=128)
    measured, estimated = summary["memory"], summary["memory_estimate"]["at_measured_step"]
    assert 0.97 < estimated["total_bytes"] / measured["training_peak_bytes"] < 1.03


def test_dora_on_8bit_layers_is_refused_where_the_libraries_cannot_train_it(tiny_model_dir, prepared_dir, tmp_path):
    """peft 0.21.2 with bitsandbytes 0.50.2 loses an 8-bit layer's scales under DoRA on a CPU: the probe of two
    passes through one such layer says so before the model loads, not a traceback from inside the first step."""
    with pytest.raises(LoragridError, match="config key 'use_dora': DoRA does not train on qlora8's 8-bit layers on "
                                            "cpu with peft .*AttributeError.* use it with lora or qlora4"):
        run(tiny_model_dir, prepared_dir, tmp_path, method="qlora8", use_dora=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("quant_type, double_quant, compute_dtype", [
    ("nf4", True, "auto"), ("fp4", False, "float32"),
])
def test_4bit_quantization_settings(tiny_model_dir, prepared_dir, tmp_path, quant_type, double_quant, compute_dtype):
    summary = run(tiny_model_dir, prepared_dir, tmp_path, method="qlora4", bnb_4bit_quant_type=quant_type,
                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
    assert summary["quantization"] == {
        "bits": 4, "quant_type": quant_type, "double_quant": double_quant,
        "compute_dtype": "bfloat16" if compute_dtype == "auto" else compute_dtype,
    }
    assert all(math.isfinite(point["loss"]) for point in summary["loss_curve"])


def test_report_to_tensorboard_writes_events(tiny_model_dir, prepared_dir, tmp_path):
    settings = {**TINY_RUN, "report_to": "tensorboard"}
    train_to_files(tiny_model_dir, prepared_dir, tmp_path / "w", tmp_path / "t.json", settings, "chat",
                   tensorboard_dir=tmp_path / "tb")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_memory_estimate_is_stored_beside_the_measurement(tiny_model_dir, prepared_dir, tmp_path):
    summary = train_to_files(tiny_model_dir, prepared_dir, tmp_path / "w", tmp_path / "t.json", TINY_RUN, "chat",
                             tensorboard_dir=tmp_path / "tb")
    assert not (tmp_path / "tb").exists()  # report_to: none
    estimate = summary["memory_estimate"]
    assert estimate["total_bytes"] == sum(estimate["breakdown"].values())
    assert estimate["process_bytes"] == estimate["total_bytes"] + estimate["runtime_bytes"]
    trainable = summary["parameters"]["trainable"]
    # The base model's bf16 weights plus the adapters, which peft keeps in fp32: what training measured.
    assert estimate["breakdown"]["weights"] == sum(summary["memory"]["weights_held"].values())
    assert summary["memory"]["weights_held"]["trainable_bytes"] == 4 * trainable
    assert estimate["breakdown"]["optimizer"] == 8 * trainable  # AdamW: two fp32 moments
    at_step = estimate["at_measured_step"]
    assert 0.85 < at_step["total_bytes"] / summary["memory"]["training_peak_bytes"] < 1.15


def test_the_estimate_at_the_measured_step_is_taken_as_the_measurement_is(tiny_model_dir):
    """The highest over the step's micro-batches, gradients held from the second one on: where the first
    micro-batch is the longest, its peak comes before any gradient exists (the memory table's steps)."""
    model = modeling.add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16), TINY_RUN)
    long, short = {"rows": 4, "sequence": 120, "labelled": 200}, {"rows": 4, "sequence": 20, "labelled": 40}
    measured = {"peak_step": 2, "profiled_steps": [{"step": 1, "micro_batches": [short, short]},
                                                   {"step": 2, "micro_batches": [long, short]}]}
    at_step = training.estimate_at_measured_step(model, TINY_RUN, measured, accumulation=2, resumed=False)
    assert at_step["sequence"] == 120 and at_step["breakdown"]["gradients"] == 0
    assert at_step["breakdown"]["optimizer"] > 0  # the second step: AdamW's moments exist
    measured["profiled_steps"][1]["micro_batches"] = [short, long]
    at_step = training.estimate_at_measured_step(model, TINY_RUN, measured, accumulation=2, resumed=False)
    assert at_step["sequence"] == 120 and at_step["breakdown"]["gradients"] == 4 * at_step["trainable"]


def test_max_memory_gb_picks_the_largest_micro_batch_that_fits(tiny_model_dir, prepared_dir, tmp_path):
    roomy = run(tiny_model_dir, prepared_dir, tmp_path, "roomy", batch_size=8, micro_batch_size=2, max_memory_gb=1000)
    assert roomy["micro_batch_size"] == 8 and roomy["gradient_accumulation_steps"] == 1

    settings = {**TINY_RUN, "batch_size": 8, "micro_batch_size": 8}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lengths = [100, 90, 80, 70, 60, 50, 40, 30, 20, 10]
    runtime = 10**8
    labelled = [length // 2 for length in lengths]
    by_micro = {micro: training.choose_micro_batch(model, {**settings, "micro_batch_size": micro}, lengths, labelled,
                                                   runtime)[1]
                for micro in (8, 4, 2)}
    # Activations grow with the micro-batch; a limit between the estimates of 8 and 4 picks 4 (2 accumulation steps).
    limit = (by_micro[8]["process_bytes"] + by_micro[4]["process_bytes"]) / 2e9
    micro, estimate = training.choose_micro_batch(model, {**settings, "max_memory_gb": limit}, lengths, labelled,
                                                  runtime)
    assert micro == 4 and estimate["total_bytes"] == by_micro[4]["total_bytes"]
    assert by_micro[8]["process_bytes"] > by_micro[4]["process_bytes"] > by_micro[2]["process_bytes"]


def test_max_memory_gb_keeps_a_resumed_checkpoints_micro_batch(tiny_model_dir, tmp_path):
    """The choice depends on the process's memory before loading, which differs between attempts; the data order and
    the kept memory profile depend on the micro-batch: a resumed run trains on with the one its checkpoint has."""
    settings = {**TINY_RUN, "batch_size": 8, "micro_batch_size": 8, "max_memory_gb": 1000}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lengths, labelled = [100, 90, 80, 70, 60, 50, 40, 30], [50, 45, 40, 35, 30, 25, 20, 15]
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2, "train_batch_size": 2}))
    assert training.choose_micro_batch(model, settings, lengths, labelled, 10**8)[0] == 8  # room for all 8
    micro, estimate = training.choose_micro_batch(model, settings, lengths, labelled, 10**8, resume_from=checkpoint)
    assert micro == 2 and estimate["micro_batch_size"] == 2


def test_max_memory_gb_too_small_fails_before_training(tiny_model_dir, prepared_dir, tmp_path):
    with pytest.raises(LoragridError, match="max_memory_gb"):
        run(tiny_model_dir, prepared_dir, tmp_path, max_memory_gb=0.001)
    assert not (tmp_path / "run").exists()


def test_max_memory_gb_without_an_estimate_fails_before_training(tiny_model_dir, prepared_dir, tmp_path):
    """GPT-2's config is not Llama-style: no estimate to pick a micro-batch from. Decided on the loaded config
    (transformers fills in what a config.json leaves out), before any step."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=640)).save_pretrained(tmp_path / "gpt2")
    for path in tiny_model_dir.iterdir():  # the tiny model's tokenizer and chat template
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copyfile(path, tmp_path / "gpt2" / path.name)
    with pytest.raises(LoragridError, match="config key 'max_memory_gb'.*no memory estimate for model type 'gpt2'"):
        run(tmp_path / "gpt2", prepared_dir, tmp_path, max_memory_gb=8)
    assert not (tmp_path / "run").exists()


def test_changed_model_file_is_detected_before_training(tiny_model_dir, prepared_dir, tmp_path):
    from loragrid.common import checksums, write_json

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    write_json(model / "source.json", {"source": "local:x", "files": checksums(model)})
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10])  # an interrupted copy
    with pytest.raises(LoragridError, match=rf"{weights.name}: changed since it was written \(sha256 differs from "
                                            rf".*source\.json\); delete {model} and run snakemake again"):
        run(model, prepared_dir, tmp_path)
    assert not (tmp_path / "run").exists()


def test_changed_prepared_split_is_detected_before_training(prepared_dir, tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    records = read_jsonl(data / "train.jsonl")
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records[:-1]) + "\n")
    with pytest.raises(LoragridError,
                       match=r"train\.jsonl: \d+ bytes, \d+ when it was written \(truncated or changed"):
        run(tiny_model_dir, data, tmp_path)
