"""The workflow through profiles/slurm on a real single-node SLURM cluster, against a local run (the shared tiny DAG).

tests/slurm/start.sh installs Debian's slurmctld, slurmd, slurm-client and munge when they are
missing and starts the daemons; the module's teardown stops exactly those daemons by PID. Without
root the cluster cannot start and the test is skipped, except where it must run (CI=true or
LORAGRID_REQUIRE_SLURM=1), where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from snakemake_executor_plugin_slurm.utils import set_gres_string

from conftest import CUSTOM_TEMPLATE, REPO, copy_workflow, tiny_config
from loragrid import launch

CLUSTER_SCRIPTS = REPO / "tests" / "slurm"
REQUIRED = os.environ.get("CI") == "true" or os.environ.get("LORAGRID_REQUIRE_SLURM") == "1"
# Snakemake under the SLURM executor ignores SIGTERM while it waits on jobs: `timeout -k` kills it.
WORKFLOW_TIMEOUT_S = 1200
# One quantized run keeps the test short: every wave of the DAG waits on SLURM and a status poll.
METHODS = ["qlora4"]


def start_cluster(state: Path) -> None:
    """Start the cluster (stop_cluster stops it); skip where it cannot run here, unless it must."""
    started = time.perf_counter()
    result = subprocess.run(["bash", str(CLUSTER_SCRIPTS / "start.sh"), str(state)],
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        stop_cluster(state)
        message = f"the SLURM cluster did not start (exit {result.returncode}): {result.stderr.strip()}"
        if result.returncode == 3 and not REQUIRED:
            pytest.skip(message)
        pytest.fail(message + "".join(f"\n--- {log.name}\n{log.read_text()[-2000:]}" for log in state.glob("*.log")))
    print(f"SLURM cluster up in {time.perf_counter() - started:.1f} s")


def stop_cluster(state: Path) -> None:
    subprocess.run(["bash", str(CLUSTER_SCRIPTS / "stop.sh"), str(state)], timeout=120)


def start_snakemake(workdir: Path, args: list[str]) -> tuple[subprocess.Popen, Path]:
    """snakemake in the background, its output in a file beside `workdir` (a pipe nobody reads could fill up)."""
    command = ["timeout", "-k", "30", str(WORKFLOW_TIMEOUT_S), sys.executable, "-m", "snakemake", *args]
    output = workdir.with_suffix(".out")
    with output.open("w") as handle:
        return subprocess.Popen(command, cwd=workdir, stdout=handle, stderr=subprocess.STDOUT), output


def finished(started: tuple[subprocess.Popen, Path]) -> str:
    process, output = started
    process.wait()
    text = output.read_text()
    assert process.returncode == 0, f"exit {process.returncode}\n{text[-8000:]}"
    return text


def run_slurm(root: Path, model_dir: Path) -> tuple[Path, str]:
    """Start the cluster, then run the workflow through profiles/slurm: the shared tiny DAG's config (the local run
    it is compared with), its quantized run only."""
    start_cluster(root / "cluster")
    cluster = copy_workflow(root / "slurm")
    config = tiny_config(cluster, model_dir, template=CUSTOM_TEMPLATE, grid={"method": METHODS})
    started = time.perf_counter()
    # The test cluster has no slurmdbd: job states come from squeue (sacct would wait forever).
    output = finished(start_snakemake(cluster, [
        "--workflow-profile", "profiles/slurm", "all", "--configfile", str(config),
        "--slurm-status-command", "squeue",
        "--slurm-init-seconds-before-status-checks", "2",
    ]))
    print(f"workflow through SLURM: {time.perf_counter() - started:.1f} s")
    return cluster, output


@pytest.fixture(scope="module")
def local_and_slurm(background_workflows, tiny_workflow):
    """What conftest started with the session: (the shared tiny DAG's folder, the SLURM folder, SLURM's output).

    The shared DAG ran the same config locally (one torch thread a job, as here), so a run's bytes must agree."""
    cluster, output = background_workflows["slurm"].result()
    return tiny_workflow[0], cluster, output


def slurm_jobs(cluster: Path) -> dict[str, list[tuple[str, str]]]:
    """rule -> [(wildcard value, SLURM job id)] from the plugin's logs, logs/slurm/rule_RULE/[VALUE/]ID.log."""
    jobs: dict[str, list[tuple[str, str]]] = {}
    for log in sorted((cluster / "logs" / "slurm").rglob("*.log")):
        rule, *value, _ = log.relative_to(cluster / "logs" / "slurm").parts
        jobs.setdefault(rule.removeprefix("rule_"), []).append(("/".join(value), log.stem))
    return jobs


def scontrol_job(job_id: str) -> dict[str, str]:
    """The job as slurmctld knows it (it keeps finished jobs for MinJobAge = 3600 s, tests/slurm/slurm.conf.in)."""
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True)
    return dict(re.findall(r"(\w+)=(\S+)", shown.stdout))


def test_every_job_ran_as_a_slurm_job(local_and_slurm):
    _, cluster, output = local_and_slurm
    jobs = slurm_jobs(cluster)
    expected = {"fetch_model": 1, "fetch_dataset": 1, "prepare": 1, "tokenize_split": 1, "train_adapter": 1,
                "merge": 1, "generate": 2, "evaluate": 2, "report": 1}
    assert {rule: len(entries) for rule, entries in jobs.items()} == expected
    for rule, entries in jobs.items():
        for _, job_id in entries:
            assert re.search(rf"submitted with SLURM jobid {job_id} \(log: .*/rule_{rule}/", output), (rule, job_id)
            job = scontrol_job(job_id)
            assert job["JobState"] == "COMPLETED", (rule, job)
            # The profile's partitions: training on `gpu`, everything else on `cpu`.
            assert job["Partition"] == ("gpu" if rule.startswith("train") else "cpu"), (rule, job)


def test_train_job_asks_for_what_its_run_needs(local_and_slurm):
    _, cluster, _ = local_and_slurm
    (run, job_id), = slurm_jobs(cluster)["train_adapter"]
    job = scontrol_job(job_id)
    train = json.loads((cluster / f"results/tiny--tiny/runs/{run}/train.json").read_text())
    settings = train["provenance"]["settings"]
    # mem_mb from the run's callable (not the profile's default), cpus_per_task from the profile.
    assert job["MinMemoryNode"] == f"{launch.train_mem_mb(settings, cluster / 'resources/models/tiny')}M"
    assert job["MinMemoryNode"] != "4000M"
    assert job["NumCPUs"] == "8"


def test_results_equal_a_local_run(local_and_slurm):
    local, cluster, _ = local_and_slurm
    for prepared in ("train.jsonl", "heldout.jsonl"):
        path = f"results/tiny--tiny/data/tiny/{prepared}"
        assert (cluster / path).read_bytes() == (local / path).read_bytes()
    for method in METHODS:
        runs = [json.loads((root / f"results/tiny--tiny/runs/{method}/train.json").read_text())
                for root in (local, cluster)]
        for key in ("parameters", "loss_curve", "steps", "tokens_seen_non_padding", "train_examples"):
            assert runs[0][key] == runs[1][key], (method, key)
        weights = "model/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors"
        assert (cluster / f"results/tiny--tiny/runs/{method}/{weights}").read_bytes() == \
            (local / f"results/tiny--tiny/runs/{method}/{weights}").read_bytes()
    for name in ["base", *METHODS]:
        path = f"results/tiny--tiny/generations/{name}.jsonl"
        assert (cluster / path).read_text() == (local / path).read_text()
    columns = ["run", "method", "trainable_params", "heldout_loss"]
    local_table, cluster_table = [pd.read_csv(root / "results/tiny--tiny/report/summary.csv")[columns]
                                  for root in (local, cluster)]
    assert list(cluster_table["run"]) == ["base", *METHODS]
    local_table = local_table[local_table["run"].isin(cluster_table["run"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(local_table, cluster_table)


class _Resources(dict):
    __getattr__ = dict.__getitem__


@pytest.mark.parametrize(("gpus", "gpu_model", "flags"), [
    (2, None, " --gpus=2"),
    (0, None, ""),  # a CPU run asks for no GPU
    (1, "a100", " --gpus=a100:1"),
    (0, "a100", " --gpus=a100:0"),  # why docs/slurm-and-gpus.md keeps gpu_model to grids that all train on GPUs
])
def test_the_gpu_flags_sbatch_gets_for_a_training_job(gpus, gpu_model, flags):
    """The plugin's own flag builder on the profile's training resources and a run's `gpus` (rules/train.smk's gpu)."""
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    resources = {**profile["default-resources"], **profile["set-resources"]["train_adapter"],
                 "gpu": launch.gpus_of({"gpus": gpus})}
    if gpu_model:
        resources["gpu_model"] = gpu_model
    assert set_gres_string(SimpleNamespace(resources=_Resources(resources))) == flags
