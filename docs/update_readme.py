"""Rewrite the README's results from a finished run, so that its table and plot cannot go stale.

    make run && .venv/bin/python docs/update_readme.py

The block between README.md's `<!-- results -->` and `<!-- /results -->` markers is replaced with
the comparison tables of the experiment's report.md (as the current code wrote them), a line
saying where and with which commit they were measured, and the report's plots: quality against
memory (copied to docs/default-run-quality-vs-memory.png) and, where benchmarks ran, the benchmark
changes (docs/default-run-benchmarks.png). Nothing else in the README changes.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results -->", "<!-- /results -->"
TABLES = ("Memory comparison", "Quality and speed")
# Shown too where the report has them (benchmarks: on in the default config).
OPTIONAL_TABLES = ("Benchmarks (lm-evaluation-harness)",)
PLOT = "docs/default-run-quality-vs-memory.png"
# The report's plots the README shows: (report file, README copy, alt text); a plot the report
# lacks (benchmarks off) is left out.
PLOTS = (
    ("quality_vs_memory.png", PLOT, "Quality against training memory per run, Pareto front in red"),
    ("benchmarks.png", "docs/default-run-benchmarks.png",
     "Each run's benchmark change against the base model: accuracy in points, perplexity in percent"),
)


def report_tables(report_md: str) -> dict[str, str]:
    """The markdown tables under the report's comparison headings, by heading."""
    tables = {}
    for title in TABLES + OPTIONAL_TABLES:
        match = re.search(rf"^## {re.escape(title)}\n\n((?:\|.*\n)+)", report_md, flags=re.MULTILINE)
        if match is not None:
            tables[title] = match.group(1).rstrip("\n")
        elif title in TABLES:
            raise SystemExit(f"report.md has no '## {title}' table: was it written by this version of loragrid?")
    return tables


def measured_where(results: Path) -> str:
    """One line: the device, the commit and the median training time per run, from the run files."""
    trains = [json.loads(path.read_text()) for path in sorted(results.glob("runs/*/train.json"))]
    if not trains:
        raise SystemExit(f"{results}/runs/*/train.json: no finished run to describe")
    commit = trains[0]["provenance"]["workflow_commit"] or "uncommitted"
    # A run from a checkout with uncommitted changes records "<sha>-dirty": the short form keeps the mark.
    commit = commit[:10] + ("-dirty" if commit.endswith("-dirty") else "")
    minutes = statistics.median(train["train_runtime_seconds"] for train in trains) / 60
    return (f"Measured on {trains[0]['device']} ({trains[0]['compute_dtype']} compute, {trains[0]['threads']} "
            f"threads) at commit `{commit}`; median training time per run {minutes:.1f} min.")


def copied_plots(results: Path, docs_root: Path) -> str:
    """Copy the report's plots beside the README; their markdown images, a paragraph each."""
    if not (results / f"report/{PLOTS[0][0]}").is_file():
        raise SystemExit(f"{results}/report/{PLOTS[0][0]}: missing: was the report written?")
    lines = []
    for name, target, alt in PLOTS:
        if (results / "report" / name).is_file():
            shutil.copyfile(results / "report" / name, docs_root / target)
            lines.append(f"![{alt}]({target})")
    return "\n\n".join(lines)


def results_block(results: Path, docs_root: Path) -> str:
    """The README's results block for the experiment in `results`; plots copied under docs_root."""
    report_md = (results / "report/report.md").read_text(encoding="utf-8")
    tables = report_tables(report_md)
    return "\n".join([
        BEGIN,
        f"<!-- written by docs/update_readme.py from {results.relative_to(results.parent.parent)}; "
        "edit the script, not this block -->",
        measured_where(results),
        "",
        *(part for title, table in tables.items() for part in (f"**{title}**", "", table, "")),
        copied_plots(results, docs_root),
        END,
    ])


def update_readme(readme: Path, results: Path) -> None:
    text = readme.read_text(encoding="utf-8")
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(f"{readme} must hold one {BEGIN} ... {END} block")
    before, rest = text.split(BEGIN)
    _, after = rest.split(END)
    readme.write_text(before + results_block(results, readme.parent) + after, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=REPO / "results/smollm2-135m-instruct--emoji_qa",
                        help="the experiment's results folder (default: the default config's)")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    arguments = parser.parse_args(argv)
    update_readme(arguments.readme, arguments.results.resolve())
    print(f"{arguments.readme}: results block rewritten from {arguments.results}")


if __name__ == "__main__":
    main()
