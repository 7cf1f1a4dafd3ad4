"""The tokenized split: written once per prepared split and tokenization, read by every run that shares it."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import TINY_RUN
from loragrid.common import LoragridError, read_json, write_json
from loragrid.tokenized import build_dataset, load_tokenized, load_tokenizer, tokenization_name, tokenize_to_disk
from loragrid.train import train
from test_workflow import FINAL, jobs_of, planned_jobs


@pytest.fixture(scope="module")
def tokenized_dir(tiny_model_dir, prepared_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenized") / tokenization_name(TINY_RUN)
    tokenize_to_disk(tiny_model_dir, prepared_dir, folder, TINY_RUN, "chat")
    return folder


def test_the_tokenized_split_holds_what_in_process_tokenizing_gives(tokenized_dir, tiny_model_dir, prepared_dir):
    stored, tokenization = load_tokenized(tokenized_dir, prepared_dir, TINY_RUN, "chat")
    fresh, fresh_tokenization = build_dataset(load_tokenizer(tiny_model_dir), "chat", prepared_dir, TINY_RUN)
    assert stored.to_list() == fresh.to_list()
    assert tokenization["truncated"] == fresh_tokenization["truncated"]
    summary = read_json(tokenized_dir / "tokenize.json")
    assert summary["examples"] == len(fresh) and summary["tokens"] == sum(fresh["length"])
    assert tokenization_name(TINY_RUN) == "cutoff128-answers-eos"


@pytest.mark.parametrize("change", [{"cutoff_len": 64}, {"train_on_inputs": True}, {"add_eos_token": False}])
def test_a_split_tokenized_with_other_settings_is_refused(tokenized_dir, prepared_dir, change):
    with pytest.raises(LoragridError, match=f"{tokenized_dir}: tokenized with .* but the run asks for"):
        load_tokenized(tokenized_dir, prepared_dir, {**TINY_RUN, **change}, "chat")
    with pytest.raises(LoragridError, match="but the run asks for"):
        load_tokenized(tokenized_dir, prepared_dir, TINY_RUN, "alpaca")


def test_a_split_tokenized_from_an_older_train_split_is_refused(tokenized_dir, prepared_dir, tmp_path):
    data = shutil.copytree(prepared_dir, tmp_path / "data")
    summary = read_json(data / "prepare.json")
    summary["output_sha256"]["train.jsonl"] = "0" * 64
    write_json(data / "prepare.json", summary)
    with pytest.raises(LoragridError, match="tokenized from another .*train.jsonl"):
        load_tokenized(tokenized_dir, data, TINY_RUN, "chat")


def test_training_reads_the_tokenized_split(tokenized_dir, tiny_model_dir, prepared_dir, tmp_path):
    summary = train(tiny_model_dir, prepared_dir, tmp_path / "adapter", TINY_RUN, "chat", tokenized_dir=tokenized_dir)
    assert summary["tokenized_split"] == str(tokenized_dir)
    assert summary["train_examples"] == read_json(tokenized_dir / "tokenize.json")["examples"]
    assert summary["steps"] == TINY_RUN["max_steps"]


def test_every_run_of_the_grid_trained_from_one_tokenized_split(tiny_workflow):
    workdir, _, _ = tiny_workflow
    (tokenized,) = (workdir / "results/tiny--tiny/tokenized/tiny/tiny").iterdir()
    assert tokenized.name == "cutoff96-answers-eos"
    for run in ("full", "lora", "qlora4", "qlora8"):
        assert json.loads((workdir / f"results/tiny--tiny/runs/{run}/train.json").read_text())["tokenized_split"] == \
            f"results/tiny--tiny/tokenized/tiny/tiny/{tokenized.name}"
    assert (workdir / f"logs/tiny--tiny/tokenize/tiny/tiny/{tokenized.name}.log").stat().st_size > 0


def test_a_run_with_a_new_cutoff_len_adds_one_tokenize_job(tiny_workflow):
    workdir, config, _ = tiny_workflow
    planned = planned_jobs(workdir, config, {"methods": {"lora": {"cutoff_len": 64}}})
    assert planned == {("tokenize_split", "cutoff64-answers-eos")} | jobs_of("lora") | FINAL
