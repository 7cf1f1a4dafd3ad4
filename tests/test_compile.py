"""Regional compilation (compile_layers): compiled decoder layers train, share one cache, and fall back to eager."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

from conftest import REPO, TINY_RUN, results_dir, snakemake, tiny_config
from loragrid.common import read_json

TRAIN_IN_A_FRESH_PROCESS = """
import json, sys
from loragrid.train import train_to_files
model, data, out, cache = sys.argv[1:5]
settings = json.loads(sys.argv[5])
summary = train_to_files(model, data, out + "/adapter", out + "/train.json", settings, "chat", compile_cache_dir=cache)
print("final loss", summary["final_loss"])
"""


def test_compiled_layers_train_through_snakemake_and_fill_the_shared_cache(copy_repo, tiny_model_dir):
    # Layers compile after the memory profile's two steps: the third step is the first compiled one.
    training = {"max_steps": 3, "micro_batch_size": 4, "lora_r": 4, "lora_alpha": 8, "cutoff_len": 96,
                "compile_layers": True}
    config = tiny_config(copy_repo, tiny_model_dir, training=training, grid={"method": ["lora"]},
                         compile_cache="cache/torch-compile")
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


def test_without_a_compiler_training_goes_on_eagerly_with_a_warning(tiny_model_dir, prepared_dir, tmp_path):
    # No C++ compiler (as on a machine with Python alone): inductor cannot build the layer's kernels.
    environment = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "PYTHONPATH": str(REPO)}
    settings = json.dumps({**TINY_RUN, "compile_layers": True, "max_steps": 3})
    result = subprocess.run([sys.executable, "-c", TRAIN_IN_A_FRESH_PROCESS, str(tiny_model_dir), str(prepared_dir),
                             str(tmp_path), str(tmp_path / "cache"), settings],
                            capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final loss" in result.stdout and (tmp_path / "adapter/adapter_model.safetensors").is_file()
    assert re.search(r"compile_layers: training eagerly, nothing compiled: .*no-such-compiler", result.stderr)
