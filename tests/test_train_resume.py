"""Kill -9 a training job of the real workflow after its first checkpoint, start the workflow again,
and check from the trainer state that it resumed and finished."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import TINY_RUN, copy_workflow, with_fetched_model
from loragrid.common import read_json
from loragrid.train import train
from test_workflow import snakemake, tiny_config

MAX_STEPS = 40
SAVE_STEPS = 5


def kill_job_when(workdir, process, ready, script_name, timeout=300):
    """SIGKILL the job running `script_name` (snakemake's own process lives on) once `ready()` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "snakemake ended before the moment to kill came"
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
        time.sleep(0.05)
    jobs = [child for child in psutil.Process(process.pid).children(recursive=True)
            if any(script_name in part for part in child.cmdline())]
    assert jobs, "no job process found"
    for job in jobs:
        job.send_signal(signal.SIGKILL)
    process.wait(timeout=120)
    assert process.returncode != 0


def complete_checkpoints(workdir):
    return sorted(workdir.glob("results/tiny--tiny/checkpoints/lora/*/checkpoint-*/trainer_state.json"))


@pytest.fixture
def resumable_config(tmp_path, tiny_model_dir, fetched_tiny_model):
    workdir = copy_workflow(tmp_path / "workflow")
    config = tiny_config(workdir, tiny_model_dir, grid={"method": ["lora"]},
                         training={"max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "save_total_limit": 2,
                                   "batch_size": 4, "micro_batch_size": 4, "lora_r": 4, "lora_alpha": 8,
                                   "cutoff_len": 96})
    with_fetched_model(workdir, fetched_tiny_model)
    return workdir, config


def test_killed_training_resumes_from_its_last_checkpoint(resumable_config, tiny_model_dir):
    workdir, config = resumable_config
    target = "results/tiny--tiny/runs/lora/train.json"
    command = [sys.executable, "-m", "snakemake", "--cores", "1", target, "--configfile", str(config)]
    first = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_job_when(workdir, first, lambda: complete_checkpoints(workdir), "train.py")

    assert not (workdir / "results/tiny--tiny/runs/lora/adapter").exists() and not (workdir / target).exists()
    checkpoints = complete_checkpoints(workdir)
    last_saved = max(read_json(path)["global_step"] for path in checkpoints)
    saved_history = max((read_json(path) for path in checkpoints),
                        key=lambda state: state["global_step"])["log_history"]
    killed_log = (workdir / "logs/tiny--tiny/train/lora.log").read_text()
    reached = killed_log.count("'loss':")
    assert 0 < last_saved < MAX_STEPS
    assert reached - last_saved <= SAVE_STEPS  # at most save_steps steps are lost

    second = snakemake(workdir, target, "--configfile", str(config))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = read_json(workdir / target)
    assert summary["resumed_from_step"] == last_saved
    assert summary["steps"] == MAX_STEPS
    assert "resuming from" in (workdir / "logs/tiny--tiny/train/lora.log").read_text()
    # The memory the first attempt measured before its checkpoint (the longest micro-batch is step 1's) stays.
    measured = summary["memory"]
    assert measured["profile_restored"] and measured["profiled_steps"][0]["step"] == 1
    state = read_json(workdir / "results/tiny--tiny/runs/lora/adapter/trainer_state.json")
    assert state["global_step"] == MAX_STEPS
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == list(range(1, MAX_STEPS + 1))
    # The steps before the checkpoint are the first attempt's, carried over, not trained again.
    assert [e for e in state["log_history"] if e.get("step", 0) <= last_saved and "loss" in e] == \
        [e for e in saved_history if "loss" in e]
    # Only this attempt's steps were trained (Trainer logs one line per step).
    assert (workdir / "logs/tiny--tiny/train/lora.log").read_text().count("'loss':") == MAX_STEPS - last_saved
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      workdir / "results/tiny--tiny/runs/lora/adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())
    # Cleaned up once both outputs are in place, the run's folder too.
    assert not (workdir / "results/tiny--tiny/checkpoints/lora").exists()


def test_checkpoint_of_other_settings_is_never_reused(tiny_model_dir, prepared_dir, tmp_path):
    settings = {**TINY_RUN, "max_steps": 4, "save_steps": 2}
    root = tmp_path / "checkpoints"
    first = train(tiny_model_dir, prepared_dir, tmp_path / "a", settings, "chat", checkpoint_root=root)
    assert first["resumed_from_step"] == 0
    (old_folder,) = list(root.iterdir())

    # Only where checkpoints are written changed: the same folder, resumed at its last step.
    same = train(tiny_model_dir, prepared_dir, tmp_path / "b", {**settings, "save_total_limit": 3},
                 "chat", checkpoint_root=root)
    assert same["resumed_from_step"] == 4 and same["checkpoints"] == str(old_folder)

    changed = train(tiny_model_dir, prepared_dir, tmp_path / "c", {**settings, "learning_rate": 5e-3},
                    "chat", checkpoint_root=root)
    assert changed["resumed_from_step"] == 0 and changed["steps"] == 4
    assert changed["checkpoints"] != str(old_folder) and not old_folder.exists()


def test_checkpoint_cut_short_is_not_resumed_from(tiny_model_dir, prepared_dir, tmp_path):
    # cutoff_len 512 cuts no answer: each step trains a different number of tokens.
    settings = {**TINY_RUN, "max_steps": 4, "save_steps": 2, "save_total_limit": 2, "cutoff_len": 512}
    root = tmp_path / "checkpoints"
    train(tiny_model_dir, prepared_dir, tmp_path / "a", settings, "chat", checkpoint_root=root)
    (folder,) = list(root.iterdir())
    # A kill while checkpoint-4 was being written: the Trainer writes trainer_state.json last.
    (folder / "checkpoint-4/trainer_state.json").unlink()
    resumed = train(tiny_model_dir, prepared_dir, tmp_path / "b", settings, "chat", checkpoint_root=root)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    # tokens/s of this attempt: the tokens of steps 3 and 4 (length-grouped: not half of them all).
    before = read_json(folder / "checkpoint-2/trainer_state.json")["num_input_tokens_seen"]
    trained = resumed["tokens_per_second"] * resumed["train_runtime_seconds"]
    assert trained == pytest.approx(resumed["tokens_seen_non_padding"] - before), (before, resumed)

    # Killed while writing trainer_state.json itself (the Trainer writes it in place): resumed from the one before.
    state = folder / "checkpoint-4/trainer_state.json"
    state.write_text('{"global_step": 4, "log_hist')
    resumed = train(tiny_model_dir, prepared_dir, tmp_path / "c", settings, "chat", checkpoint_root=root)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4


def test_interrupted_fetch_is_not_taken_as_complete(tmp_path, tiny_model_dir):
    """Kill the fetch while it copies the model: no model folder appears, and the next run fetches again."""
    import shutil

    big_model = tmp_path / "big-model"
    shutil.copytree(tiny_model_dir, big_model)
    with open(big_model / "zz-padding.safetensors.extra", "wb") as handle:  # slows the copy down
        handle.write(b"\0" * 300_000_000)
    workdir = copy_workflow(tmp_path / "workflow")
    config = tiny_config(workdir, big_model)
    model_dir = workdir / "resources/models/tiny"
    command = [sys.executable, "-m", "snakemake", "--cores", "1", str(model_dir.relative_to(workdir)),
               "--configfile", str(config)]
    process = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The staging folder exists from the fetch's start until its last step renames it into place.
    kill_job_when(workdir, process, lambda: any((workdir / "resources/models").glob(".tiny.tmp-*")), "fetch_model.py")
    assert not model_dir.exists()
    planned = snakemake(workdir, str(model_dir.relative_to(workdir)), "--configfile", str(config), "--dry-run")
    assert "fetch_model" in planned.stdout
