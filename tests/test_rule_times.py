"""bench/rule_times.py tabulates a real workflow run's benchmark files."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, results_dir


def test_rule_times_lists_every_benchmarked_job_of_a_finished_run(tiny_workflow):
    workdir, _, _ = tiny_workflow
    results = results_dir(workdir)
    shown = subprocess.run([sys.executable, "bench/rule_times.py", str(results)], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
    jobs = sorted((results / "benchmarks").rglob("*.tsv"))
    assert len(jobs) >= 10  # fetch, tokenize, 4 trainings, 3 merges, generations and evaluations
    for job in jobs:
        rule = job.relative_to(results / "benchmarks").parts[0]
        assert f"| {rule} | {'/'.join(job.relative_to(results / 'benchmarks').with_suffix('').parts[1:])} |" in shown
    assert f"| **all rules** | {len(jobs)} jobs |" in shown
