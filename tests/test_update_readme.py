"""docs/update_readme.py: the README's results come from a real report, in the current code's columns."""

from __future__ import annotations

import importlib.util
import re
import shutil

from conftest import REPO, results_dir

spec = importlib.util.spec_from_file_location("update_readme", REPO / "docs/update_readme.py")
update_readme = importlib.util.module_from_spec(spec)
spec.loader.exec_module(update_readme)


def header_rows(markdown: str) -> list[list[str]]:
    """The column names of every markdown table in `markdown`, in order."""
    lines = markdown.splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line, below in zip(lines, lines[1:]) if line.startswith("|") and re.match(r"^\|:?-", below)]


def results_block(text: str) -> str:
    return text.split(update_readme.BEGIN)[1].split(update_readme.END)[0]


def test_the_script_writes_the_reports_tables_and_plot_into_the_block(tiny_workflow, tmp_path):
    workdir, _, _ = tiny_workflow
    readme = tmp_path / "README.md"
    shutil.copyfile(REPO / "README.md", readme)
    (tmp_path / "docs").mkdir()
    update_readme.main(["--results", str(results_dir(workdir)), "--readme", str(readme)])

    before, after = (REPO / "README.md").read_text(), readme.read_text()
    assert before.split(update_readme.BEGIN)[0] == after.split(update_readme.BEGIN)[0]
    assert before.split(update_readme.END)[1] == after.split(update_readme.END)[1]
    report = (results_dir(workdir) / "report/report.md").read_text()
    block = results_block(after)
    tables = update_readme.report_tables(report)
    assert set(update_readme.TABLES) <= set(tables)
    for title, table in tables.items():
        assert f"## {title}" in report and table.strip() in block
    assert "Measured on cpu" in block and "median training time per run" in block
    for name, target, _ in update_readme.PLOTS:  # the tiny DAG runs benchmarks: both plots
        assert (tmp_path / target).read_bytes() == (results_dir(workdir) / "report" / name).read_bytes()
        assert f"]({target})" in block


def test_every_plot_the_readme_shows_is_one_the_script_writes():
    """A hand-placed plot in the README would go stale: each image must be one update_readme copies."""
    shown = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (REPO / "README.md").read_text())
    assert shown and set(shown) <= {target for _, target, _ in update_readme.PLOTS}


def test_the_readmes_tables_have_the_current_reports_columns(tiny_workflow):
    """A report column added or renamed since the README was last regenerated fails here: run
    `make run && .venv/bin/python docs/update_readme.py`."""
    workdir, _, _ = tiny_workflow
    report = (results_dir(workdir) / "report/report.md").read_text()
    current = header_rows("\n".join(update_readme.report_tables(report).values()))
    assert header_rows(results_block((REPO / "README.md").read_text())) == current
