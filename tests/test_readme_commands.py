"""Every command the README, config/README and docs/config.md show runs in a test: here as a dry run, or in the test
named beside it (where it trains, chats or renders). A new command without an entry fails."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

PAGES = ("README.md", "config/README.md", "docs/config.md", "docs/sources-formats-templates.md")
# command -> the test that runs it, or "dry-run" (run below with -n, my.yaml standing for the user's file)
COMMANDS = {
    "make run": "tests/test_real_model.py::test_default_workflow_on_the_embedded_model",  # + `make -n run` below
    "make test": ".ci/run",
    "make memory-table": "dry-run",
    "snakemake --cores 1 all": "tests/test_real_model.py::test_default_workflow_on_the_embedded_model",
    "snakemake --cores 1 all --configfile my.yaml": "dry-run",
    "snakemake --cores 1 -n all": "dry-run",
    "snakemake --cores 1 all --sdm conda": "dry-run",
    "snakemake --report results/report.html":
        "tests/test_report_html.py::test_report_is_self_contained_with_captions_and_labels",
    "python -m loragrid chat --run lora": "tests/test_chat.py::test_interactive_chat_in_a_terminal",
    "snakemake --cores 1 all --configfile config/config.yaml my.yaml": "dry-run",
    "snakemake --cores 1 all --config 'generate={max_new_tokens: 64}'": "dry-run",
    "python -m loragrid runs --configfile my.yaml": "dry-run",
    # the export itself runs through Snakemake in tests/test_export.py (a config file that sets the same keys)
    "snakemake --cores 1 all --config 'export={enabled: true}'": "dry-run",
    # docs/config.md
    "snakemake -n": "dry-run",
    "snakemake --cores 1 -n all --configfile my.yaml": "dry-run",
    'snakemake --cores 1 -n all --config "grid={_: [{method: lora, learning_rate: 0.0002}, {method: qlora4, '
    'learning_rate: 0.001}], lora_r: [16, 64]}"': "dry-run",
    'snakemake --cores 1 all --config "generate={max_new_tokens: 64}" "methods={lora: {learning_rate: 0.0005}}"':
        "dry-run",
    "snakemake --cores 1 --forcerun train_adapter train_full all": "dry-run",
    "snakemake --cores 1 --forcerun tokenize_split all": "dry-run",
    "python -m loragrid runs": "dry-run",
}
PROGRAMS = ("make ", "snakemake ", "python -m loragrid ")
# Named in the text, not shown as something to run.
MENTIONS = {"python -m loragrid chat", "python -m loragrid chat / runs / memory", "snakemake --list-changes params"}


def shown_commands() -> set[str]:
    """Commands in code blocks (a line each, comments cut) and in inline code, as the pages show them."""
    found = set()
    for page in PAGES:
        text = (REPO / page).read_text()
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
            found.update(line.split("#")[0].strip() for line in block.splitlines())
        found.update(re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)))
    # `.venv/bin/snakemake` is `snakemake` from the environment `make run` creates.
    found = {re.sub(r"^\.venv/bin/", "", command) for command in found}
    return {command for command in found if command.startswith(PROGRAMS)} - MENTIONS


def test_every_shown_command_has_a_test():
    assert shown_commands() == set(COMMANDS)
    for command, test in COMMANDS.items():
        if "::" in test:
            path, name = test.split("::")
            assert f"def {name}(" in (REPO / path).read_text(), (command, test)


def _dry_run(command: str, tmp_path) -> list[str]:
    my = tmp_path / "my.yaml"
    my.write_text(yaml.safe_dump({"grid": {"method": ["lora"]}, "experiment": "readme-dry-run"}))
    words = [str(my) if word == "my.yaml" else word for word in re.findall(r"'[^']*'|\"[^\"]*\"|\S+", command)]
    words = [word.strip("'\"") for word in words]
    if words[0] == "make":
        return ["make", "-n", *words[1:]]
    if words[0] == "snakemake":
        return [sys.executable, "-m", *words, *([] if "-n" in words else ["-n"])]
    return [sys.executable, *words[1:]]  # runs and memory only read and compute: run as shown


@pytest.mark.parametrize("command", [c for c, test in COMMANDS.items() if test == "dry-run"] + ["make run"])
def test_a_shown_command_runs(command, tmp_path):
    result = subprocess.run(_dry_run(command, tmp_path), cwd=REPO, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    if "--sdm conda" in command:
        # Parsed, `all` taken as the target: it stops only at the missing conda (no channel reachable here).
        assert "Error running conda info" in output and "invalid choice" not in output, output[-2000:]
        return
    assert result.returncode == 0, output[-2000:]
    if "--forcerun" in command:  # the rules named, and every training rule (the full run trains in train_full)
        forced = command.split("--forcerun ")[1].split()[:-1]  # the words between --forcerun and the target
        for rule in {*forced, "train_adapter", "train_full"}:
            assert re.search(rf"^{rule} +\d", output, re.M), output
    if command.startswith("make"):
        target = {"make run": "snakemake --cores 1 all", "make memory-table": "--configfile config/memory-table.yaml"}
        assert target[command] in output
