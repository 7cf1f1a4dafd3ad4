"""Benchmarks through lm-evaluation-harness: the rule in the tiny DAG for the base model and every run,
lm-eval's perplexity against loragrid's own rolling log-likelihood, and bad input naming its key."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import REPO, results_dir, snakemake, tiny_config, with_fetched_model
from loragrid import modeling
from loragrid.benchmarks import rolling_loglikelihood, rolling_token_windows
from loragrid.tokenized import load_tokenizer
from test_workflow import FINAL, planned_jobs

NAMES = ["base", "full", "lora", "qlora4", "qlora8"]
TASKS = ["loragrid_sense", "loragrid_hollow_lane"]


@pytest.mark.parametrize("length", [1, 7, 16, 17, 50, 129])
@pytest.mark.parametrize("max_length", [1, 4, 16, 33])
def test_rolling_windows_are_lm_evals(length, max_length):
    """loragrid's windows predict the same tokens from the same inputs as lm-eval's rolling windows."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens, prefix = list(range(length)), -1
    theirs = [make_disjoint_window(window) for window in
              get_rolling_token_windows(tokens, prefix_token=prefix, max_seq_len=max_length, context_len=1)]
    ours = rolling_token_windows(length, max_length)
    assert len(ours) == len(theirs)
    sequence = [prefix, *tokens]
    for (context, predicted), (first, end) in zip(theirs, ours):
        assert predicted == tokens[first:end]
        # HFLM feeds the last max_length tokens of context + continuation, minus the last one.
        assert (context + predicted)[-(max_length + 1):][:-1] == sequence[max(0, end - max_length):end]


def test_the_rule_benchmarks_the_base_model_and_every_run(tiny_workflow):
    workdir, _, output = tiny_workflow
    results = results_dir(workdir)
    for name in NAMES:
        folder = results / "lm_eval" / name
        written = {p.name for p in folder.iterdir() if p.name != ".snakemake_timestamp"}
        samples = {f"samples_{task}.jsonl" for task in TASKS}
        assert written == {"manifest.json", "results.json", "summary.json", *samples}
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["tasks"]["loragrid_sense"]["documents"] == 8
        assert 0 <= summary["tasks"]["loragrid_sense"]["acc"] <= 1
        assert summary["tasks"]["loragrid_hollow_lane"]["documents"] == 1
        assert summary["tasks"]["loragrid_hollow_lane"]["word_perplexity"] > 1
        assert set(json.loads((folder / "results.json").read_text())["results"]) == set(TASKS)
        assert len((folder / "samples_loragrid_sense.jsonl").read_text().splitlines()) == 8
        assert (results / f"benchmarks/benchmark/{name}.tsv").exists()
        log = (workdir / f"logs/tiny--tiny/benchmark/{name}.log").read_text()
        assert "Running loglikelihood requests: 100%" in log
    assert output.count("(Rule: benchmark)") == len(NAMES)
    table = pd.read_csv(results / "report/summary.csv")
    assert table.loc[table["run"] == "full", "bench.loragrid_sense.acc.vs_full_percent"].item() == 100
    assert table["bench.loragrid_hollow_lane.word_perplexity"].notna().all()
    assert set(json.loads((results / "report/evaluation_results.json").read_text())) == set(NAMES)
    assert (results / "report/benchmarks.png").stat().st_size > 10_000
    report = (results / "report/report.md").read_text()
    assert "## Benchmarks (lm-evaluation-harness)" in report and "loragrid_sense acc, % of full" in report


@pytest.mark.parametrize("name", ["base", "lora"])
def test_lm_evals_perplexity_matches_loragrids_own_computation(tiny_workflow, name):
    """The token log-likelihood lm-eval reports for the text equals plain transformers' over the same windows."""
    workdir, _, _ = tiny_workflow
    model_dir = workdir / ("resources/models/tiny" if name == "base" else "results/tiny--tiny/runs/lora/merged")
    summary = json.loads((results_dir(workdir) / f"lm_eval/{name}/summary.json").read_text())
    reported = summary["tasks"]["loragrid_hollow_lane"]
    text = json.loads((REPO / "data/benchmarks/hollow_lane.jsonl").read_text().splitlines()[0])["text"]
    model = modeling.load_for_inference(model_dir, dtype=torch.float32)
    own, tokens = rolling_loglikelihood(model, load_tokenizer(model_dir), text, reported["max_length"])
    assert tokens == reported["tokens"] and tokens > 4 * reported["max_length"]  # several windows
    assert abs(own - reported["token_loglikelihood"]) <= 0.01 * abs(own)


def test_a_benchmark_setting_reruns_only_the_benchmarks(tiny_workflow):
    workdir, config, _ = tiny_workflow
    planned = planned_jobs(workdir, config, {"benchmarks": {"limit": {"loragrid_sense": 9}}})
    assert planned == {("benchmark", name) for name in NAMES} | FINAL


def test_editing_a_task_file_reruns_the_benchmarks(tiny_workflow):
    workdir, config, _ = tiny_workflow
    data = workdir / "data/benchmarks/common_sense_mc.jsonl"
    original = data.read_bytes()
    try:  # Snakemake compares an input's checksum, not only its mtime: the content must change
        data.write_bytes(original + b"\n")
        assert planned_jobs(workdir, config) == {("benchmark", name) for name in NAMES} | FINAL
    finally:
        data.write_bytes(original)


BROKEN_TASK = """task: broken_mc
dataset_path: json
dataset_kwargs: {data_files: {test: data/benchmarks/common_sense_mc.jsonl}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_target: answer
"""


@pytest.mark.parametrize("tasks, env, message", [
    (["loragrid_sens"], {}, "config key 'benchmarks.tasks': no task 'loragrid_sens' in benchmarks.task_dir or in "
                            "lm-eval (local tasks: broken_mc, loragrid_hollow_lane, loragrid_sense; did you mean "
                            "loragrid_sense"),
    (["wikitext"], {"HF_HUB_OFFLINE": "1"}, "config key 'benchmarks.tasks': 'wikitext' is lm-eval's task on a "
                                            "Hugging Face hub dataset, and the hub (huggingface.co) cannot be "
                                            "reached"),
    (["broken_mc"], {}, "config key 'benchmarks.tasks': task 'broken_mc' (data/benchmarks/broken.yaml) has no "
                        "'doc_to_choice' field"),
])
def test_a_bad_task_stops_snakemake_before_any_job(copy_repo, tiny_model_dir, tasks, env, message):
    (copy_repo / "data/benchmarks/broken.yaml").write_text(BROKEN_TASK)
    config = tiny_config(copy_repo, tiny_model_dir, benchmarks={"tasks": tasks})
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "-n", "all", "--configfile",
                             str(config)], cwd=copy_repo, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env})
    assert result.returncode != 0
    assert message in " ".join((result.stdout + result.stderr).split())
    assert not (copy_repo / "results").exists()


@pytest.mark.parametrize("settings, message", [
    ({"max_length": 1024}, "config key 'benchmarks.max_length': 1024 tokens, but the model in resources/models/tiny "
                           "takes at most 512"),
    ({"batch_size": 10**6}, "config key 'benchmarks.batch_size': 1000000 windows of 512 tokens need about"),
])
def test_a_benchmark_the_model_cannot_take_fails_before_it_loads(copy_repo, tiny_model_dir, fetched_tiny_model,
                                                                 settings, message):
    config = tiny_config(copy_repo, tiny_model_dir, benchmarks={"limit": 1, **settings})
    with_fetched_model(copy_repo, fetched_tiny_model)
    result = snakemake(copy_repo, "results/tiny--tiny/lm_eval/base", "--configfile", str(config))
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0
    assert message in output and "(details: logs/tiny--tiny/benchmark/base.log)" in output
    assert "Loading weights" not in (copy_repo / "logs/tiny--tiny/benchmark/base.log").read_text()
    assert not (copy_repo / "results/tiny--tiny/lm_eval/base").exists()
