"""The workflow follows Snakemake's conventions: lint, formatting, catalog files, progress and logs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO, snakemake, tiny_config

BIN = Path(sys.executable).parent


def test_snakemake_lint_reports_nothing(copy_repo):
    result = snakemake(copy_repo, "--lint")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Lints for" not in output


def test_snakefmt_check_passes():
    result = subprocess.run([BIN / "snakefmt", "--check", "--compact-diff", "."], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_workflow_catalog_files():
    catalog = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    usage = catalog["usage"]
    assert usage["report"] is True
    assert set(usage["software-stack-deployment"]) == {"conda", "apptainer", "apptainer+conda"}
    assert usage["software-stack-deployment"]["conda"] is True
    assert {p.stem for p in (REPO / "envs").glob("*.yaml")}, "conda: true needs envs/*.yaml"
    assert "desc" in usage["mandatory-flags"]


def test_config_readme_documents_every_top_level_key():
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    readme = (REPO / "config" / "README.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", readme, flags=re.MULTILINE))
    assert documented == set(schema["properties"])


def test_one_progress_line_per_finished_job(tiny_workflow):
    _, _, output = tiny_workflow
    finished = re.findall(r"^Finished jobid: \d+ \(Rule: (\w+)\)$", output, flags=re.MULTILINE)
    progress = re.findall(r"^(\d+) of (\d+) steps \(\d+%\) done$", output, flags=re.MULTILINE)
    total = int(progress[-1][1])
    assert len(finished) == len(progress) == total
    assert [int(done) for done, _ in progress] == list(range(1, total + 1))
    assert {"prepare", "train_adapter", "train_full", "merge", "generate", "evaluate", "report", "all"} <= set(finished)


def test_training_and_generation_show_progress_bars_in_their_logs(tiny_workflow):
    workdir, _, _ = tiny_workflow
    # The Trainer's bar over the tiny config's 2 steps, and generate's tqdm over its one batch.
    assert re.search(r"100%\|[^|]*\| 2/2 \[", (workdir / "logs/tiny--tiny/train/lora.log").read_text())
    assert re.search(r"generate: 100%\|[^|]*\| 1/1 \[", (workdir / "logs/tiny--tiny/generate/lora.log").read_text())


def test_a_failed_job_names_its_log(copy_repo, tiny_model_dir):
    config = tiny_config(copy_repo, tiny_model_dir, training={"max_steps": 2, "target_modules": ["no_such_proj"]})
    result = snakemake(copy_repo, "results/tiny--tiny/runs/lora/train.json", "--configfile", str(config))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "config key 'target_modules'" in output and "(details: logs/tiny--tiny/train/lora.log)" in output
    assert "ERROR: config key 'target_modules'" in (copy_repo / "logs/tiny--tiny/train/lora.log").read_text()
    assert not (copy_repo / "results/tiny--tiny/runs/lora/adapter").exists()
