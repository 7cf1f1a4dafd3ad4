"""The configs that reproduce the seeds: valid, and a real `snakemake -n` plans the whole DAG
(a dry run fetches nothing, so no hub is needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from snakemake.utils import validate

from conftest import REPO
from loragrid.config import check_config, check_keys


def merged(name: str) -> dict:
    """The seed config merged over config/config.yaml, as `--configfile` merges it."""
    from snakemake.utils import update_config

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(config, yaml.safe_load((REPO / "config" / name).read_text()))
    check_keys(config)
    validate(config, str(REPO / "config" / "schema.yaml"))
    return config


def test_qwen_seed_grid():
    runs = check_config(merged("qwen2.5-0.5b.yaml"), workdir=REPO)
    assert sorted(runs) == ["full", "lora", "qlora4", "qlora8"]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert {k: runs["lora"][k]
            for k in ("lora_r", "lora_alpha", "lora_dropout", "learning_rate", "target_modules")} == \
        {"lora_r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "learning_rate": 1e-4, "target_modules": targets}
    assert runs["qlora4"]["learning_rate"] == runs["qlora8"]["learning_rate"] == 2e-4
    assert runs["lora"]["max_steps"] == -1  # the default config's 30-step demo schedule does not leak in


def test_alpaca_cleaned_defaults():
    config = merged("alpaca-cleaned.yaml")
    runs = check_config(config, workdir=REPO)
    assert config["template"] == "alpaca" and config["dataset"]["format"] == "alpaca"
    assert config["split"]["heldout_min"] == 2000
    run = runs["lora"]
    assert (run["cutoff_len"], run["lora_r"], run["lora_alpha"], run["lora_dropout"]) == (256, 8, 16, 0.05)


def test_memory_table_config_resolves_the_guides_settings_and_checkpointing_per_method():
    runs = check_config(merged("memory-table.yaml"), workdir=REPO)
    assert list(runs) == ["full", "lora", "qlora4", "qlora8"]
    assert {name: run["gradient_checkpointing"] for name, run in runs.items()} == {
        "full": False, "lora": False, "qlora4": True, "qlora8": True}
    assert all((run["lora_r"], run["micro_batch_size"], run["cutoff_len"]) == (64, 4, 512)
               for name, run in runs.items() if name != "full")


@pytest.mark.parametrize("name, runs", [("qwen2.5-0.5b.yaml", 4), ("alpaca-cleaned.yaml", 1),
                                        ("memory-table.yaml", 4)])
def test_dry_run_plans_the_whole_workflow(copy_repo, name, runs):
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "-n", "all", "--configfile",
                             f"config/{name}"], cwd=copy_repo, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    for rule in ("fetch_model", "fetch_dataset", "prepare", "report"):
        assert f"rule {rule}:" in output or f"localrule {rule}:" in output, rule
    assert output.count("rule generate:") == runs + 1  # every run and the base model
    assert not (copy_repo / "resources").exists()
