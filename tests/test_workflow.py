"""The real snakemake on a tiny config: the whole DAG, a no-op rerun, and bad input at workflow start."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import CUSTOM_TEMPLATE, demo_records, results_dir, snakemake, tiny_config
from loragrid.common import read_json


def test_whole_dag_writes_the_report(tiny_workflow):
    workdir, _, _ = tiny_workflow
    table = pd.read_csv(workdir / "results/tiny--tiny/report/summary.csv")
    assert list(table["run"]) == ["base", "full", "lora", "qlora4", "qlora8"]
    assert table["heldout_loss"].notna().all()
    weights = dict(zip(table["run"], table["weights_gb"]))
    assert weights["qlora4"] < weights["lora"] < weights["full"]
    # gradient_checkpointing: auto (the default) reaches each job resolved per method.
    checkpointing = {name: read_json(workdir / f"results/tiny--tiny/runs/{name}/train.json")["gradient_checkpointing"]
                     for name in ("full", "lora", "qlora4", "qlora8")}
    assert checkpointing == {"full": False, "lora": False, "qlora4": True, "qlora8": True}
    # The custom template reached training, merge, generation and evaluation as written.
    for name in ("full", "lora"):
        provenance = json.loads((workdir / f"results/tiny--tiny/runs/{name}/train.json").read_text())["provenance"]
        assert provenance["settings"]["template"] == CUSTOM_TEMPLATE
        assert read_json(workdir / f"results/tiny--tiny/eval/{name}.json")["template"] == CUSTOM_TEMPLATE
    merged = read_json(workdir / "results/tiny--tiny/runs/lora/merge.json")
    assert merged["max_relative_logit_difference"] < 1e-3
    report = (workdir / "results/tiny--tiny/report/report.md").read_text()
    assert "training memory (GB)" in report and "qlora8" in report
    for name in ("base", "full", "lora", "qlora4", "qlora8"):
        assert len((workdir / f"results/tiny--tiny/generations/{name}.jsonl").read_text().splitlines()) == 8
        assert json.loads((workdir / f"results/tiny--tiny/eval/{name}.json").read_text())["questions"] == 8
    for rule in ("train/lora", "merge/qlora4", "generate/base", "evaluate/full", "prepare/tiny"):
        assert (workdir / f"logs/tiny--tiny/{rule}.log").stat().st_size > 0
    assert (workdir / "results/tiny--tiny/benchmarks/train/qlora4.tsv").exists()


def test_outputs_load_with_the_libraries(tiny_workflow, tiny_model_dir):
    workdir, _, _ = tiny_workflow
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    PeftModel.from_pretrained(base, workdir / "results/tiny--tiny/runs/lora/adapter")
    AutoModelForCausalLM.from_pretrained(workdir / "results/tiny--tiny/runs/qlora4/merged")
    AutoModelForCausalLM.from_pretrained(workdir / "results/tiny--tiny/runs/full/model")
    merge = json.loads((workdir / "results/tiny--tiny/runs/lora/merge.json").read_text())
    assert merge["max_relative_logit_difference"] <= merge["tolerance"]


def test_second_run_does_nothing(tiny_workflow):
    workdir, config, _ = tiny_workflow
    result = snakemake(workdir, "all", "--configfile", str(config), "--dry-run")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def planned_jobs(workdir, config, change: dict | None = None, *extra) -> set[tuple[str, str]]:
    """(rule, wildcard value) of every job a dry run plans after `change` is merged over `config`."""
    change_file = workdir / "change.yaml"
    change_file.write_text(yaml.safe_dump(change or {}))
    result = snakemake(workdir, "all", "--configfile", str(config), str(change_file), "--dry-run", *extra)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    jobs, rule = set(), None
    for line in result.stdout.splitlines():
        if line.startswith(("rule ", "localrule ")):
            rule = line.split()[1].rstrip(":")
            jobs.add((rule, ""))
        elif line.strip().startswith("wildcards:") and rule:
            jobs.discard((rule, ""))
            jobs.add((rule, line.split("=", 1)[1].strip()))
    return jobs


def jobs_of(name, train_rule="train_adapter"):
    return {(train_rule, name), ("merge", name), ("generate", name), ("evaluate", name), ("benchmark", name)}


FINAL = {("report", ""), ("all", "")}


def test_one_runs_learning_rate_reruns_only_that_run(tiny_workflow):
    workdir, config, _ = tiny_workflow
    assert planned_jobs(workdir, config, {"methods": {"lora": {"learning_rate": 0.005}}}) == jobs_of("lora") | FINAL


def test_command_line_config_overrides_work_like_config_files(tiny_workflow):
    workdir, config, _ = tiny_workflow
    planned = planned_jobs(workdir, config, None, "--config", "methods={lora: {learning_rate: 0.005}}")
    assert planned == jobs_of("lora") | FINAL


def test_a_new_grid_value_adds_only_the_new_runs(tiny_workflow):
    workdir, config, _ = tiny_workflow
    grid = {"method": ["full", "lora", "qlora4", "qlora8"], "lora_r": [4, 8]}
    planned = planned_jobs(workdir, config, {"grid": grid})
    assert planned == jobs_of("lora-r8") | jobs_of("qlora4-r8") | jobs_of("qlora8-r8") | FINAL


def test_a_thread_count_change_reruns_nothing(tiny_workflow):
    workdir, config, _ = tiny_workflow
    assert planned_jobs(workdir, config, {"torch_threads": 2}) == set()


def test_settings_that_change_no_result_rerun_nothing(tiny_workflow):
    """Greedy decoding ignores temperature, top_p and the seed; gguf_file is read by pypi: sources only; 0 is the
    default weight decay 0.0 (Snakemake compares params as text). Each re-ran jobs before 2026-12-07."""
    workdir, config, _ = tiny_workflow
    for change in ({"generate": {"temperature": 0.5, "top_p": 0.5, "seed": 3}}, {"model": {"gguf_file": "x.gguf"}},
                   {"training": {"weight_decay": 0}}):
        assert planned_jobs(workdir, config, change) == set(), change
    # Checkpoint and logging settings are run settings like the others (docs/config.md): they re-train.
    rules = {rule for rule, _ in planned_jobs(workdir, config, {"training": {"save_steps": 5}})}
    assert {"train_full", "train_adapter"} <= rules and not {"prepare", "tokenize_split"} & rules


def test_generation_change_reruns_generation_not_training(tiny_workflow):
    workdir, config, _ = tiny_workflow
    planned = planned_jobs(workdir, config, {"generate": {"max_new_tokens": 5}})
    names = ["base", "full", "lora", "qlora4", "qlora8"]
    assert planned == {(rule, n) for n in names for rule in ("generate", "evaluate")} | FINAL


def test_heldout_seed_change_reruns_prepare_and_everything_after(tiny_workflow):
    workdir, config, _ = tiny_workflow
    planned = planned_jobs(workdir, config, {"split": {"seed": 7}})
    rules = {rule for rule, _ in planned}
    assert rules == {"prepare", "tokenize_split", "train_adapter", "train_full", "merge", "generate", "evaluate",
                     "benchmark", "report", "all"}
    assert len(planned) == 1 + 1 + 4 + 3 + 5 + 5 + 4 + 2  # the base model's benchmark does not depend on the data


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"grid": {"method": ["lora", "qlora3"]}}, "method"),
        ({"grid": {"method": ["lora"], "lora_r": [0]}}, "grid.lora_r"),
        ({"template": "vicuna"}, "template"),
        ({"dataset": {"name": "x", "source": "local:missing.jsonl"}}, "dataset.source"),
        ({"training": {"learning_rate": -1}}, "learning_rate"),
        ({"runs": {"base": {"method": "lora"}}}, "runs.base"),
    ],
)
def test_bad_config_fails_at_start_naming_the_key(copy_repo, tiny_model_dir, overrides, message):
    config = tiny_config(copy_repo, tiny_model_dir, **overrides)
    result = snakemake(copy_repo, "all", "--configfile", str(config), "--dry-run")
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (copy_repo / "results").exists()


def test_malformed_jsonl_fails_prepare_naming_file_and_line(copy_repo, tiny_model_dir):
    lines = [json.dumps(r) for r in demo_records(48)]
    lines.insert(11, '{"question": "broken", ')
    config = tiny_config(copy_repo, tiny_model_dir, records=lines)
    result = snakemake(copy_repo, "results/tiny--tiny/data/tiny/prepare.json", "--configfile", str(config))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "tiny.jsonl, line 12: invalid JSON" in output
    assert "logs/tiny--tiny/prepare/tiny.log" in output
    prepared = copy_repo / "results/tiny--tiny/data/tiny"
    assert not prepared.exists() or not any(prepared.iterdir())


def test_skipped_records_are_counted(copy_repo, tiny_model_dir):
    lines = [json.dumps(r) for r in demo_records(48)]
    lines.insert(11, '{"question": "broken", ')
    config = tiny_config(copy_repo, tiny_model_dir, records=lines,
                         dataset={"name": "tiny", "source": "local:tiny.jsonl", "on_bad_record": "skip"})
    result = snakemake(copy_repo, "results/tiny--tiny/data/tiny/prepare.json", "--configfile", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((copy_repo / "results/tiny--tiny/data/tiny/prepare.json").read_text())
    assert summary["rejected"] == [{"file": "tiny.jsonl", "line": 12, "reason": summary["rejected"][0]["reason"]}]
    assert summary["records_valid"] == 48


def test_another_model_is_another_experiment_and_both_keep_their_results(tiny_workflow):
    workdir, config, _ = tiny_workflow
    other = yaml.safe_load(config.read_text())
    other["model"]["name"] = "tiny-b"
    other["grid"] = {"method": ["lora"]}
    other["benchmarks"] = {"tasks": []}
    (workdir / "other.yaml").write_text(yaml.safe_dump(other))
    first_report = (results_dir(workdir) / "report/summary.csv").read_bytes()
    try:
        _run_a_second_experiment(workdir, config, first_report)
    finally:  # the shared workflow keeps one experiment (`loragrid chat` would ask which one otherwise)
        shutil.rmtree(results_dir(workdir, "tiny-b--tiny"), ignore_errors=True)


def _run_a_second_experiment(workdir, config, first_report):
    result = snakemake(workdir, "all", "--configfile", "other.yaml")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert pd.read_csv(results_dir(workdir, "tiny-b--tiny") / "report/summary.csv")["run"].tolist() == ["base", "lora"]
    assert (results_dir(workdir) / "report/summary.csv").read_bytes() == first_report
    back = snakemake(workdir, "all", "--configfile", str(config), "--dry-run")
    assert "Nothing to be done" in back.stdout + back.stderr  # switching back retrains nothing
    index = (workdir / "results/index.md").read_text()
    assert "| tiny--tiny | `local:" in index and "| tiny-b--tiny | `local:" in index
    assert "| 1: lora | [report.md](tiny-b--tiny/report/report.md) |" in index
