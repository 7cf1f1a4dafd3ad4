"""How `make test`'s two xdist workers share the background workflow runs and the shared tiny DAG (conftest)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_once, shared_dag_modules, xdist_scope

TESTS = Path(__file__).resolve().parent

# One worker's side: run_once on a slow run that leaves a mark for each call.
WORKER = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import run_once

folder = Path(sys.argv[1])

def slow_run(out):
    with open(folder / "calls.txt", "a") as handle:
        handle.write("call\\n")
    time.sleep(1)
    return out, "finished"

values = run_once(folder, "demo", slow_run, folder / "out")
print(json.dumps([type(values[0]).__name__, *map(str, values)]))
"""


def test_a_background_run_runs_once_for_two_workers(tmp_path):
    script = WORKER.format(tests=str(TESTS))
    workers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), [err[-2000:] for _, err in outputs]
    assert (tmp_path / "calls.txt").read_text() == "call\n"
    assert [json.loads(out) for out, _ in outputs] == [["PosixPath", str(tmp_path / "out"), "finished"]] * 2


def test_a_failed_run_fails_the_other_workers_tests_with_its_error(tmp_path):
    def broken():
        raise RuntimeError("snakemake exited with 1")

    with pytest.raises(RuntimeError, match="exited with 1"):
        run_once(tmp_path, "demo", broken)
    with pytest.raises(pytest.fail.Exception, match="demo workflow failed .*RuntimeError: snakemake exited with 1"):
        run_once(tmp_path, "demo", lambda: pytest.fail("a failed run must not run again"))


def test_a_skipped_run_skips_the_other_workers_tests(tmp_path):
    with pytest.raises(pytest.skip.Exception, match="no root here"):
        run_once(tmp_path, "demo", lambda: pytest.skip("no root here"))
    with pytest.raises(pytest.skip.Exception, match="no root here"):
        run_once(tmp_path, "demo", lambda: pytest.fail("a skipped run must not run again"))


def test_the_modules_of_the_shared_dag_run_on_one_worker_and_the_others_whole():
    shared = shared_dag_modules()
    assert {"test_workflow.py", "test_benchmarks.py", "test_chat.py", "test_tokenized.py"} <= shared
    assert "test_config.py" not in shared and Path(__file__).name not in shared
    scopes = {xdist_scope(f"tests/{module}::test_one", shared) for module in shared}
    assert len(scopes) == 1
    assert xdist_scope("tests/test_config.py::test_one", shared) == xdist_scope("tests/test_config.py::test_two",
                                                                                  shared) == "test_config.py"
