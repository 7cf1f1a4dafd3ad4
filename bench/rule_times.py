"""Where a workflow run's time went: one row per job from Snakemake's benchmark files.

    python bench/rule_times.py                                   # the default experiment
    python bench/rule_times.py results/qwen2.5-0.5b-shape-random--emoji_qa

Every heavy rule has a `benchmark:` file under results/{exp}/benchmarks/{rule}/...tsv; this prints
them as a markdown table (wall seconds, CPU seconds, peak resident memory) with a total per rule
and the sum of all jobs, which is the run's time when jobs run one at a time (`--cores 1`).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def job_rows(results: Path) -> list[dict]:
    """One dict per benchmark file: rule, job (its wildcards as a path), seconds, cpu seconds, max RSS MB."""
    rows = []
    for path in sorted((results / "benchmarks").rglob("*.tsv")):
        relative = path.relative_to(results / "benchmarks").with_suffix("")
        with path.open(encoding="utf-8") as handle:
            for record in csv.DictReader(handle, delimiter="\t"):
                rows.append({"rule": relative.parts[0], "job": "/".join(relative.parts[1:]),
                             "seconds": float(record["s"]), "cpu_seconds": float(record["cpu_time"]),
                             "max_rss_mb": float(record["max_rss"])})
    if not rows:
        raise SystemExit(f"{results}/benchmarks: no benchmark files (has the workflow run?)")
    return rows


def markdown_table(rows: list[dict]) -> str:
    per_rule: dict[str, float] = defaultdict(float)
    for row in rows:
        per_rule[row["rule"]] += row["seconds"]
    lines = ["| rule | job | wall s | CPU s | max RSS (GB) |", "|:--|:--|--:|--:|--:|"]
    lines += [f"| {row['rule']} | {row['job']} | {row['seconds']:.1f} | {row['cpu_seconds']:.1f} | "
              f"{row['max_rss_mb'] / 1024:.2f} |" for row in rows]
    lines += [f"| **{rule}** | all jobs | **{seconds:.1f}** | | |" for rule, seconds in per_rule.items()]
    total = sum(per_rule.values())
    lines.append(f"| **all rules** | {len(rows)} jobs | **{total:.1f}** ({total / 60:.1f} min) | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", type=Path, default=REPO / "results/smollm2-135m-instruct--emoji_qa")
    print(markdown_table(job_rows(parser.parse_args(argv).results)))


if __name__ == "__main__":
    main()
