"""The throughput benchmark's configurations run (on the tiny model): the bench stays runnable.

The QLoRA comparison (--qlora) is covered by one configuration of each tool and quantization."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.parametrize("configuration", ["seed", "trl", "loragrid", "trl-qlora4", "loragrid-qlora8"])
def test_each_configuration_of_the_throughput_bench_trains(tiny_model_dir, configuration):
    command = [sys.executable, "bench/train_throughput.py", "--one", configuration, "--examples", "4",
               "--model", str(tiny_model_dir)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads(result.stdout.strip().splitlines()[-1])
    assert run["configuration"] == configuration and run["examples"] == 4
    assert run["tokens"] > 0 and run["tokens_per_second"] > 0 and run["peak_rss_bytes"] > 0
    assert math.isfinite(run["final_answer_loss"]) and run["final_answer_loss"] > 0
    # Model FLOPs: 4N per token for adapters (6N only for full fine-tuning) and attention on top.
    assert run["model_flops"] > 4 * run["tokens"] * 1000


def test_the_compile_summary_reads_the_compiling_step_and_the_steps_after(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "bench/train_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # Two profiled steps, the compiling step, then steady steps: eager 1.0 s, compiled 0.7 s.
    runs = [{"label": "eager", "seconds": 10.0, "final_answer_loss": 2.0, "step_seconds": [2, 2, 1.0, 1.0, 1.0]},
            {"label": "compiled, cold cache", "seconds": 70.0, "final_answer_loss": 2.0,
             "step_seconds": [2, 2, 61.0, 0.7, 0.7]},
            {"label": "compiled, warm cache", "seconds": 12.0, "final_answer_loss": 2.0,
             "step_seconds": [2, 2, 4.0, 0.7, 0.7]}]
    bench.print_compile(runs)
    printed = capsys.readouterr().out
    assert "per-step gain after compiling: 0.300 s (30 %)" in printed
    assert "cold cache: the compiling step costs 60.0 s more than an eager one; it pays off after 200 steps" in printed
    assert "warm cache: the compiling step costs 3.0 s more than an eager one; it pays off after 10 steps" in printed
