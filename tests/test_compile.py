"""Regional compilation (compile_layers): compiled decoder layers train, share one cache, and fall back to eager."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

from conftest import results_dir, snakemake, tiny_config, with_fetched_model
from loragrid.common import read_json


def test_compiled_layers_train_through_snakemake_and_fill_the_shared_cache(copy_repo, tiny_model_dir,
                                                                         fetched_tiny_model, monkeypatch):
    # Scalar C++ kernels: g++ compiles them without ATen's SIMD headers, 47 CPU-s for this test instead of 61
    # (inductor's own switch; what loragrid does with the compiled layers is the same).
    monkeypatch.setenv("TORCHINDUCTOR_VEC_ISA_OK", "0")
    # Layers compile after the memory profile's two steps: the third step is the first compiled one.
    training = {"max_steps": 3, "micro_batch_size": 4, "lora_r": 4, "lora_alpha": 8, "cutoff_len": 96,
                "compile_layers": True}
    config = tiny_config(copy_repo, tiny_model_dir, training=training, grid={"method": ["lora"]},
                         compile_cache="cache/torch-compile")
    with_fetched_model(copy_repo, fetched_tiny_model)
    train_json = results_dir(copy_repo) / "runs/lora/train.json"
    outcome = snakemake(copy_repo, str(train_json.relative_to(copy_repo)), "--configfile", str(config))
    assert outcome.returncode == 0, outcome.stdout[-3000:] + outcome.stderr[-3000:]

    summary = read_json(train_json)
    assert summary["provenance"]["settings"]["compile_layers"] is True
    assert math.isfinite(summary["final_loss"])
    log = (copy_repo / "logs/tiny--tiny/train/lora.log").read_text()
    assert "compiling 2 decoder layers" in log
    cache = copy_repo / "cache/torch-compile"
    assert any(path.is_file() for path in cache.rglob("*")), "the inductor cache named by compile_cache is empty"


def test_without_a_compiler_the_training_job_goes_on_eagerly_with_a_warning(copy_repo, tiny_model_dir,
                                                                             fetched_tiny_model):
    """The training job through Snakemake on a machine with no C++ compiler (inductor cannot build kernels)."""
    training = {"max_steps": 3, "micro_batch_size": 4, "lora_r": 4, "lora_alpha": 8, "cutoff_len": 96,
                "compile_layers": True}
    config = tiny_config(copy_repo, tiny_model_dir, training=training, grid={"method": ["lora"]})
    with_fetched_model(copy_repo, fetched_tiny_model)
    train_json = results_dir(copy_repo) / "runs/lora/train.json"
    environment = {**os.environ, "CXX": str(copy_repo / "no-such-compiler")}
    command = [sys.executable, "-m", "snakemake", "--cores", "2", str(train_json.relative_to(copy_repo)),
               "--configfile", str(config)]
    result = subprocess.run(command, cwd=copy_repo, capture_output=True, text=True, timeout=900, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert math.isfinite(read_json(train_json)["final_loss"])
    log = (copy_repo / "logs/tiny--tiny/train/lora.log").read_text()
    assert re.search(r"compile_layers: training eagerly, nothing compiled: .*no-such-compiler", log)
