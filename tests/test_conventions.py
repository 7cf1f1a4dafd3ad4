"""The workflow follows Snakemake's conventions (lint, formatting, catalog files, progress and logs) and the code
its own: ruff clean, functions under 60 lines, rules under 25."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO, snakemake, tiny_config, with_fetched_model

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


def test_ruff_reports_nothing():
    result = subprocess.run([BIN / "ruff", "check", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


MAX_FUNCTION_LINES = 60
MAX_RULE_LINES = 25


def function_lengths() -> dict[str, int]:
    """Lines of every function and method of the library, the job scripts, the benches and docs' scripts."""
    lengths = {}
    for path in sorted([*REPO.glob("loragrid/*.py"), *REPO.glob("scripts/*.py"), *REPO.glob("bench/*.py"),
                        *REPO.glob("docs/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{path.relative_to(REPO)}:{node.lineno} {node.name}"] = node.end_lineno - node.lineno + 1
    return lengths


def rule_lengths() -> dict[str, int]:
    """Lines of every rule (snakefmt writes a rule as one block without blank lines)."""
    lengths = {}
    for path in [REPO / "Snakefile", *sorted(REPO.glob("rules/*.smk"))]:
        for block in re.findall(r"^((?:use )?rule \w+.*?)(?:\n\n|\Z)", path.read_text(), flags=re.M | re.S):
            lengths[f"{path.relative_to(REPO)}: {block.splitlines()[0]}"] = len(block.splitlines())
    return lengths


def test_functions_stay_under_60_lines():
    assert len(function_lengths()) > 200
    assert {name: n for name, n in function_lengths().items() if n > MAX_FUNCTION_LINES} == {}


def test_rules_stay_under_25_lines():
    assert any("rule train_adapter" in name for name in rule_lengths())
    assert {name: n for name, n in rule_lengths().items() if n > MAX_RULE_LINES} == {}


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
    rules = {"prepare", "train_adapter", "train_full", "merge", "generate", "evaluate", "report", "all"}
    assert rules <= set(finished)


def test_training_and_generation_show_progress_bars_in_their_logs(tiny_workflow):
    workdir, _, _ = tiny_workflow
    logs = workdir / "logs/tiny--tiny"
    # The Trainer's bar over the tiny config's 2 steps, and generate's tqdm over its one batch.
    assert re.search(r"100%\|[^|]*\| 2/2 \[", (logs / "train/lora.log").read_text())
    assert re.search(r"generate: 100%\|[^|]*\| 1/1 \[", (logs / "generate/lora.log").read_text())
    # Tokenizing the train split's 40 records, and the held-out loss over the 8 held-out answers in one batch.
    tokenize_log = next((logs / "tokenize").rglob("*.log")).read_text()
    assert re.search(r"tokenize: 100%\|[^|]*\| 40/40 \[", tokenize_log)
    assert re.search(r"held-out loss: 100%\|[^|]*\| 1/1 \[", (logs / "evaluate/lora.log").read_text())


def test_no_log_and_no_console_line_warns_of_a_deprecated_api(tiny_workflow):
    """A deprecation warning is a call on its way out. train.json's gradient_checkpointing (the memory table's
    checkpointing column) read transformers' deprecated alias, which v6 removes; peft's own such call is
    silenced where loragrid makes it (modeling.without_peft_deprecation_warning)."""
    workdir, _, output = tiny_workflow
    texts = {str(path.relative_to(workdir)): path.read_text() for path in (workdir / "logs").rglob("*.log")}
    texts["snakemake's output"] = output
    warned = {name: re.findall(r"\w*(?:Future|Deprecation)Warning: .*", text) for name, text in texts.items()}
    assert not {name: lines for name, lines in warned.items() if lines}
    assert len(texts) > 20  # every job's log was read

def test_a_failed_job_names_its_log_and_the_other_runs_train_on(copy_repo, tiny_model_dir, fetched_tiny_model):
    # DoRA on qlora8's 8-bit layers: refused by the training job itself (peft and bitsandbytes cannot train it here).
    config = tiny_config(copy_repo, tiny_model_dir, training={"max_steps": 2, "use_dora": True},
                         grid={"method": ["qlora8", "lora"]})
    with_fetched_model(copy_repo, fetched_tiny_model)
    failing, other = "results/tiny--tiny/runs/qlora8/train.json", "results/tiny--tiny/runs/lora/train.json"
    # One job at a time, qlora8's first: lora's training starts only after qlora8's has failed.
    result = snakemake(copy_repo, failing, other, "--configfile", str(config), "--cores", "1", "--prioritize", failing)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "config key 'training.use_dora' (run qlora8): DoRA does not train on qlora8's 8-bit layers on cpu" in output
    assert "(details: logs/tiny--tiny/train/qlora8.log)" in output
    assert "ERROR: config key 'training.use_dora'" in (copy_repo / "logs/tiny--tiny/train/qlora8.log").read_text()
    assert not (copy_repo / "results/tiny--tiny/runs/qlora8/adapter").exists()
    # keep-going (profiles/default): the failed run did not stop the rest of the grid.
    assert (copy_repo / other).exists(), output[-3000:]
