"""The throughput benchmark's three configurations run (on the tiny model): the bench stays runnable."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.parametrize("configuration", ["seed", "trl", "loragrid"])
def test_each_configuration_of_the_throughput_bench_trains(tiny_model_dir, configuration):
    command = [sys.executable, "bench/train_throughput.py", "--one", configuration, "--examples", "4",
               "--model", str(tiny_model_dir)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads(result.stdout.strip().splitlines()[-1])
    assert run["configuration"] == configuration and run["examples"] == 4
    assert run["tokens"] > 0 and run["tokens_per_second"] > 0 and run["peak_rss_bytes"] > 0
    assert math.isfinite(run["final_answer_loss"]) and run["final_answer_loss"] > 0
