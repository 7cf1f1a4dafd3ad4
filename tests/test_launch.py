"""loragrid.launch: the resources a training job asks for, GPU checks, and the `accelerate launch` command line."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from accelerate.commands.launch import launch_command_parser
from transformers import AutoModelForCausalLM

from conftest import REPO, TINY_RUN, copy_workflow, demo_records, write_jsonl
from loragrid import estimate, launch, modeling
from loragrid.common import LoragridError, read_json
from loragrid.config import CHECKPOINTING_BY_METHOD
from loragrid.train import train_run, train_to_files

# SmolLM2-135M-Instruct, the default model (its config.json), and the training processes' resident
# peaks of the README's default run (micro-batch 8, cutoff_len 256, checkpointing per method) in GB.
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}
SMOLLM2_MEASURED_RSS_GB = {"full": 7.45, "lora": 5.51, "qlora4": 2.94, "qlora8": 3.32}
DEFAULT_RUN = {"micro_batch_size": 8, "batch_size": 8, "cutoff_len": 256, "gpus": 0, "lora_r": 16,
               "target_modules": "all-linear", "lora_dropout": 0.0, "optimizer": "adamw_torch_fused"}


def request_gb(method, sizes=None, **settings):
    run = {**DEFAULT_RUN, "method": method, "gradient_checkpointing": CHECKPOINTING_BY_METHOD[method], **settings}
    return launch.train_mem_mb_for(run, sizes or estimate.model_sizes(SMOLLM2)) / 1000


@pytest.mark.parametrize("method", sorted(SMOLLM2_MEASURED_RSS_GB))
def test_memory_request_covers_the_measured_cpu_peak_without_waste(method):
    measured = SMOLLM2_MEASURED_RSS_GB[method]
    assert measured < request_gb(method) < 2 * measured


def test_memory_request_follows_method_gpus_and_batch():
    # Each method asks for what its estimate says it holds: full > LoRA > QLoRA-8 > QLoRA-4.
    assert request_gb("full") > request_gb("lora") > request_gb("qlora8") > request_gb("qlora4")
    assert request_gb("full", micro_batch_size=16) > request_gb("full")
    # On a GPU the host only loads the weights; each DDP process loads its own copy.
    assert request_gb("full", gpus=1) < request_gb("full")
    assert request_gb("full", gpus=2) == pytest.approx(2 * request_gb("full", gpus=1), abs=1)
    # A 7B full fine-tune on a CPU needs 16 bytes per parameter before activations.
    seven_b = estimate.model_sizes(json.loads((REPO / "config/models/qwen2.5-7b.json").read_text()))
    assert request_gb("full", seven_b) > 16 * 7.6


def test_memory_request_reads_the_model_folder(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sizes = launch.model_sizes(tiny_model_dir)
    assert sizes["layers"] == model.config.num_hidden_layers
    # Every parameter is a layer's linear weight, the (tied) embedding or a norm.
    assert estimate.total_parameters(sizes) == model.num_parameters()
    settings = {**TINY_RUN, "gpus": 0}
    assert launch.train_mem_mb(settings, tiny_model_dir) == launch.train_mem_mb_for(settings, sizes)


def test_memory_request_without_an_estimate_counts_the_weights_on_disk(tmp_path):
    """An architecture the estimate cannot describe (GPT-2's config.json) asks for its weights and optimizer state."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=512, n_layer=1, n_head=4, vocab_size=50257, n_positions=128))
    model.save_pretrained(tmp_path / "gpt2")
    # The header counts the tied head once, as the model does: 29 million parameters.
    assert launch.parameters_on_disk(tmp_path / "gpt2") == model.num_parameters() > 25_000_000
    settings = {**TINY_RUN, "gpus": 0, "method": "full"}
    # 1.25 x (1.5 GB + 18 bytes a parameter: fp32 weights, gradients, AdamW's moments, autocast's copy), whole GB.
    expected = math.ceil(1.25 * (1.5e9 + 18 * model.num_parameters()) / 1e9) * 1000
    assert launch.train_mem_mb(settings, tmp_path / "gpt2") == expected == 3000
    # A pickled model (the torch: source) has no safetensors header: 2 bytes a parameter of the pickle's size.
    (tmp_path / "pickled").mkdir()
    shutil.copyfile(tmp_path / "gpt2/config.json", tmp_path / "pickled/config.json")
    (tmp_path / "pickled/pytorch_model.pickle.bin").write_bytes(bytes(4 * 1000))
    assert launch.parameters_on_disk(tmp_path / "pickled") == 2000


def test_memory_request_waits_for_the_model(tmp_path):
    # Snakemake takes a FileNotFoundError naming an input as "known once the input exists".
    with pytest.raises(FileNotFoundError) as missing:
        launch.train_mem_mb(TINY_RUN, tmp_path / "not-fetched")
    assert missing.value.filename == str(tmp_path / "not-fetched")


def test_a_run_asking_for_more_gpus_than_visible_fails_before_training(tiny_model_dir, prepared_dir, tmp_path):
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    settings = {**TINY_RUN, "gpus": visible + 1}
    with pytest.raises(LoragridError, match=rf"config key 'gpus': the run asks for {visible + 1} GPU"):
        train_run(settings, model_dir=tiny_model_dir, data_dir=prepared_dir,
                  weights_dir=tmp_path / "adapter", train_json=tmp_path / "train.json", template="chat")
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "train.json").exists()
    assert launch.check_gpus({**TINY_RUN, "gpus": 0}) == 0


def test_the_gpus_error_names_the_key_the_user_wrote():
    """Through the training job's keys_as_written: `training: {gpus: N}` is named as such, not as runs.RUN.gpus."""
    from snakemake.cli import parse_config

    from conftest import REPO
    from loragrid.config import checked_runs, keys_as_written, load_config

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    config = load_config(command_line=parse_config([f"training={{gpus: {visible + 1}}}", "grid={method: [lora]}"]))
    checked_runs(config, workdir=REPO)  # fills in the schema's defaults, as the Snakefile does
    wanted = rf"^config key 'training.gpus' \(run lora\): the run asks for {visible + 1}"
    with pytest.raises(LoragridError, match=wanted):
        with keys_as_written(config, "lora"):
            launch.check_gpus({**TINY_RUN, "gpus": visible + 1})


def test_accelerate_command_is_what_accelerate_parses(tmp_path):
    command = launch.accelerate_command(4, tmp_path / "call.json", "bf16", 29777, python="/venv/bin/python")
    assert command[:3] == ["/venv/bin/python", "-m", "accelerate.commands.launch"]
    parsed = launch_command_parser().parse_args(command[3:])
    assert parsed.multi_gpu and parsed.num_processes == 4 and parsed.num_machines == 1
    assert parsed.mixed_precision == "bf16" and parsed.main_process_port == 29777
    assert parsed.module and parsed.training_script == "loragrid.launch"
    assert parsed.training_script_args == [str(tmp_path / "call.json")]


def test_each_process_launches_a_module_that_exists():
    shown = subprocess.run([sys.executable, "-m", "loragrid.launch", "--help"], cwd=REPO,
                           capture_output=True, text=True, check=True)
    assert "train_to_files" in shown.stdout


def test_mixed_precision_matches_the_compute_dtype():
    assert launch.mixed_precision(torch.bfloat16) == "bf16"
    assert launch.mixed_precision(torch.float16) == "fp16"
    assert launch.mixed_precision(torch.float32) == "no"
    if not torch.cuda.is_available():
        # bf16 on a CPU: fp16 matmuls crawl there.
        assert modeling.compute_dtype() == torch.bfloat16


def test_each_ddp_process_loads_quantized_weights_on_its_own_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert modeling.process_gpu() == 3


def test_free_ports_differ_between_jobs():
    assert launch.free_port() > 0


def test_gpu_and_memory_resources_reach_the_train_jobs(tmp_path, tiny_model_dir):
    workdir = copy_workflow(tmp_path / "workflow")
    data = write_jsonl(workdir / "tiny.jsonl", demo_records(48))
    config = {
        "model": {"name": "tiny", "source": f"local:{tiny_model_dir}"},
        "dataset": {"name": "tiny", "source": f"local:{data.name}"},
        "split": {"heldout_min": 8},
        "grid": {"method": ["lora"]},
        "runs": {"ddp": {"method": "full", "gpus": 2}},
    }
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--workflow-profile", "profiles/slurm", "--dry-run", "all",
         "--configfile", "tiny.yaml"],
        cwd=workdir, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = result.stdout.split("\n\n")
    train_ddp = next(job for job in jobs if "rule train_full:" in job and "run=ddp" in job)
    train_lora = next(job for job in jobs if "rule train_adapter:" in job and "run=lora" in job)
    # The model is not fetched yet, so the memory request waits for it; GPUs are known now.
    assert "gpu=2" in train_ddp and "mem_mb=<TBD>" in train_ddp and "slurm_partition=gpu" in train_ddp
    assert "gpu=0" in train_lora and "cpus_per_task=8" in train_lora


def test_two_ddp_processes_train_one_run_and_only_the_first_writes(tiny_model_dir, prepared_dir, tmp_path):
    # The very command a run with `gpus: 2` launches; without GPUs its two processes train on the
    # CPU over gloo, which is still DDP: both take part in every step, one writes the results.
    call = {"model_dir": str(tiny_model_dir), "data_dir": str(prepared_dir), "weights_dir": str(tmp_path / "adapter"),
            "train_json": str(tmp_path / "train.json"), "template": "chat", "settings": {**TINY_RUN, "gpus": 2}}
    call_file = tmp_path / "call.json"
    call_file.write_text(json.dumps(call))
    command = launch.accelerate_command(2, call_file, launch.mixed_precision(modeling.compute_dtype()),
                                        launch.free_port())
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rank 1 loragrid.train" in result.stdout + result.stderr  # the second process trained too
    ddp = read_json(tmp_path / "train.json")
    single = train_to_files(tiny_model_dir, prepared_dir, tmp_path / "single", tmp_path / "single.json",
                            {**TINY_RUN, "gpus": 0}, "chat")
    assert ddp["steps"] == single["steps"] == TINY_RUN["max_steps"]
    # DDP's all-reduce buckets hold a copy of every gradient in each process, from the first backward pass on:
    # the estimate counts them in every moment of the step (without them it was 0.90 of rank 0's measurement
    # for full fine-tuning of a width-256 model).
    buckets = ddp["memory_estimate"]["breakdown"]["gradients"] - single["memory_estimate"]["breakdown"]["gradients"]
    assert buckets == 4 * ddp["parameters"]["trainable"]
    # Each optimizer step takes a micro-batch from each process: about twice the tokens.
    assert ddp["tokens_seen_non_padding"] > 1.5 * single["tokens_seen_non_padding"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not list(tmp_path.glob(".adapter.tmp-*"))
