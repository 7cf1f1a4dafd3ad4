"""`python -m loragrid`, in process: the options a user can get wrong fail with a message, not a traceback;
and as a process whose reader stops early."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from loragrid.__main__ import main
from loragrid.common import LoragridError

QWEN_7B = str(REPO / "config/models/qwen2.5-7b.json")
SETTINGS = {"max_new_tokens": 96, "do_sample": False, "repetition_penalty": 1.0, "temperature": 1.0, "top_p": 1.0,
            "seed": 0}


def memory_rows(capsys, *args) -> dict[str, list[str]]:
    assert main(["memory", "--model", QWEN_7B, *args]) == 0
    return {line.split(" | ")[0]: line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]}


def test_budget_finds_the_largest_micro_batch_that_fits_not_a_power_of_two(capsys):
    largest = int(memory_rows(capsys, "--budget-gb", "24")["qlora4"][8])
    assert largest > 16  # 1, 2, 4, ..., 64 stopped at 16 although 24 fits in 19.7 GB
    assert float(memory_rows(capsys, "--micro-batch", str(largest))["qlora4"][7]) <= 24
    assert float(memory_rows(capsys, "--micro-batch", str(largest + 1))["qlora4"][7]) > 24


def test_budget_names_the_search_cap_when_the_cap_fits(capsys):
    rows = memory_rows(capsys, "--budget-gb", "100000")
    assert {cells[8] for cells in rows.values()} == {"1024 or more"}
    rows = memory_rows(capsys, "--budget-gb", "400")
    assert 64 < int(rows["qlora4"][8]) < 1024  # beyond the old search's 64


def write_generation_record(workdir, run: str, model_dir) -> None:
    generations = workdir / "results/exp/generations"
    generations.mkdir(parents=True, exist_ok=True)
    record = {"model_dir": str(model_dir), "template": "chat", "settings": SETTINGS}
    (generations / f"{run}.json").write_text(json.dumps(record))


@pytest.fixture
def results(tmp_path, tiny_model_dir):
    """A workflow folder with what chat reads: 'base' on the tiny model, whose weights are there, and 'lora'
    with an adapter whose base and merged weights are not."""
    write_generation_record(tmp_path, "base", tiny_model_dir)
    run = tmp_path / "results/exp/runs/lora"
    write_generation_record(tmp_path, "lora", run.relative_to(tmp_path) / "merged")
    (run / "adapter").mkdir(parents=True)
    (run / "adapter/adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "resources/models/x"}))
    return tmp_path


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_new_tokens_below_one_is_refused_before_the_model_loads(results, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(["chat", "--directory", str(results), "--run", "base", "--max-new-tokens", value, "--question", "hi"])
    assert exit_.value.code == 2
    assert f"argument --max-new-tokens: expected a whole number above 0, got '{value}'" in capsys.readouterr().err


def test_chat_keeps_the_max_new_tokens_it_is_given(results):
    from loragrid.chat import Chat

    with pytest.raises(LoragridError, match="max_new_tokens 0"):
        Chat(results, "base", max_new_tokens=0)  # not the run's 96
    assert "max_new_tokens 1," in Chat(results, "base", max_new_tokens=1).description


@pytest.mark.parametrize("merged", [False, True])
def test_chat_names_missing_weights_and_how_to_make_them(results, capsys, merged):
    missing = results / ("results/exp/runs/lora/merged" if merged else "resources/models/x")
    assert main(["chat", "--directory", str(results), "--run", "lora", "--question", "hi"]
                + ["--merged"] * merged) == 2
    error = capsys.readouterr().err
    assert f"its weights {missing} are missing" in error and "`snakemake --cores 1 all`" in error


def test_runs_names_a_config_value_that_is_not_key_value(capsys):
    assert main(["runs", "--config", "nonsense"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("loragrid runs: --config nonsense: ") and "KEY=VALUE" in error


def test_an_empty_question_is_refused_not_taken_for_interactive_chat(results, capsys):
    """A script passing an empty variable fell into interactive chat and waited for input."""
    assert main(["chat", "--directory", str(results), "--run", "base", "--question", " "]) == 2
    assert "--question is empty" in capsys.readouterr().err


# Unbuffered, memory's first print meets the closed pipe; buffered, the flush at exit does (as it does --help's
# text: unbuffered, argparse drops a failed --help write itself).
@pytest.mark.parametrize(("args", "unbuffered"), [(["memory", "--model", QWEN_7B], "1"),
                                                  (["memory", "--model", QWEN_7B], ""), (["memory", "--help"], "")])
def test_a_reader_that_stops_early_gets_no_traceback(args, unbuffered):
    """`python -m loragrid memory ... | head -1` ended in a BrokenPipeError traceback once head had gone."""
    command = subprocess.Popen([sys.executable, "-m", "loragrid", *args], cwd=REPO,
                               env={**os.environ, "PYTHONUNBUFFERED": unbuffered},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    command.stdout.close()  # the reader is gone before the first line is written (Python takes ~1 s to start)
    error = command.stderr.read()
    assert (command.wait(), error) == (141, "")  # 128 + SIGPIPE, as the shell reports `ls` cut short


def test_no_job_or_chat_warns_about_bitsandbytes_hub_kernels():
    """bitsandbytes, on a CPU with AVX512-BF16, warns on import that it could not fetch a hub kernel (the `kernels`
    package): noise before every chat answer and in every job's log. Importing loragrid first silences it."""
    def stderr_of(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr

    if "kernels-community" not in stderr_of("import bitsandbytes"):
        pytest.skip("this CPU's bitsandbytes backend does not try the hub kernel")
    assert "kernels-community" not in stderr_of("import loragrid, bitsandbytes")
