"""The real snakemake on data that is neither JSONL nor qa: a folder of CSV/Parquet files, multi-turn
sharegpt conversations and a non-default template, through training, merge, generation and evaluation."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from conftest import demo_records, snakemake, with_fetched_model
from loragrid.common import read_json, read_jsonl


def test_a_folder_of_csv_and_parquet_files_prepares_by_snakemake(copy_repo, tiny_model_dir):
    records = [{"question": r["question"], "answer_en": r["answer_en"]} for r in demo_records(48)]
    (copy_repo / "mydata").mkdir()
    pd.DataFrame(records[:24]).to_csv(copy_repo / "mydata" / "part1.csv", index=False)
    pd.DataFrame(records[24:] + [{"question": "empty?", "answer_en": None}]).to_parquet(
        copy_repo / "mydata" / "part2.parquet")
    config = {"model": {"name": "tiny", "source": f"local:{tiny_model_dir}"},
              "dataset": {"name": "mine", "source": "local:mydata", "on_bad_record": "skip"},
              "split": {"heldout_min": 8}}
    (copy_repo / "c.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(copy_repo, "results/tiny--mine/data/mine/prepare.json", "--configfile", "c.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_json(copy_repo / "results/tiny--mine/data/mine/prepare.json")
    assert summary["records_valid"] == 48 and summary["source"] == ["mydata/part1.csv", "mydata/part2.parquet"]
    assert summary["rejected"] == [{"file": "mydata/part2.parquet", "row": 25,
                                    "reason": "answer field 'answer_en' is empty "
                                              "(an empty answer teaches the model to say nothing)"}]

    again = snakemake(copy_repo, "results/tiny--mine/data/mine/prepare.json", "--configfile", "c.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr  # the same source: nothing is fetched again
    pd.DataFrame(records[:20]).to_csv(copy_repo / "mydata" / "part3.csv", index=False)  # the folder changed
    changed = snakemake(copy_repo, "results/tiny--mine/data/mine/prepare.json", "--configfile", "c.yaml", "-n")
    assert "rule fetch_dataset:" in changed.stdout and "rule prepare:" in changed.stdout
    (copy_repo / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config["dataset"]["source"] = "local:other.jsonl"  # a changed source
    (copy_repo / "c.yaml").write_text(yaml.safe_dump(config))
    moved = snakemake(copy_repo, "results/tiny--mine/data/mine/prepare.json", "--configfile", "c.yaml", "-n")
    assert "rule fetch_dataset:" in moved.stdout and "rule prepare:" in moved.stdout


def test_multi_turn_sharegpt_with_the_alpaca_zh_template_end_to_end(copy_repo, tiny_model_dir, fetched_tiny_model):
    conversations = []
    for r in demo_records(48):
        conversations.append({"system": "Answer with emoji.", "conversations": [
            {"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hi 👋"},
            {"from": "human", "value": r["question"]}, {"from": "gpt", "value": r["answer_en"]}]})
    (copy_repo / "chats.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations))
    config = {
        "model": {"name": "tiny", "source": f"local:{tiny_model_dir}"},
        "dataset": {"name": "chats", "source": "local:chats.jsonl", "format": "messages"},
        "template": "alpaca_zh",
        "split": {"heldout_min": 8},
        "training": {"max_steps": 2, "micro_batch_size": 4, "lora_r": 4, "lora_alpha": 8, "cutoff_len": 160},
        "grid": {"method": ["lora"]},
        "generate": {"max_new_tokens": 4, "batch_size": 8},
        "torch_threads": 1,
    }
    (copy_repo / "c.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    with_fetched_model(copy_repo, fetched_tiny_model)
    result = snakemake(copy_repo, "results/tiny--chats/eval/lora.json", "--configfile", "c.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    heldout = read_jsonl(copy_repo / "results/tiny--chats/data/chats/heldout.jsonl")
    assert [m["role"] for m in heldout[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    train = read_json(copy_repo / "results/tiny--chats/runs/lora/train.json")
    assert train["provenance"]["settings"]["template"] == "alpaca_zh" and train["train_examples"] == 40
    assert read_json(copy_repo / "results/tiny--chats/eval/lora.json")["template"] == "alpaca_zh"
    assert len(read_jsonl(copy_repo / "results/tiny--chats/generations/lora.jsonl")) == 8


def _template_config(copy_repo, tiny_model_dir, template, data_format="qa"):
    records = demo_records(48)
    if data_format == "alpaca":
        records = [{"instruction": r["question"], "input": "", "output": r["answer_en"]} for r in records]
    config = {
        "model": {"name": "tiny", "source": f"local:{tiny_model_dir}"},
        "dataset": {"name": "tiny", "source": "local:tiny.jsonl", "format": data_format},
        "template": template,
        "split": {"heldout_min": 8},
        "training": {"max_steps": 2, "micro_batch_size": 4, "lora_r": 4, "lora_alpha": 8, "cutoff_len": 160},
        "grid": {"method": ["lora"]},
        "generate": {"max_new_tokens": 4, "batch_size": 8},
        "torch_threads": 1,
    }
    (copy_repo / "tiny.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    (copy_repo / "c.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    return "c.yaml"


@pytest.mark.parametrize("template, data_format, prompt_start",
                         [("plain", "qa", "用户: "), ("alpaca", "alpaca", "Below is an instruction")])
def test_named_templates_shape_the_tokenized_prompts_through_snakemake(copy_repo, tiny_model_dir, fetched_tiny_model,
                                                                       template, data_format, prompt_start):
    """The alpaca case also reads alpaca-format records (instruction / input / output)."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    config = _template_config(copy_repo, tiny_model_dir, template, data_format)
    with_fetched_model(copy_repo, fetched_tiny_model)
    result = snakemake(copy_repo, "all", "--until", "tokenize_split", "--configfile", config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [folder] = (copy_repo / "results/tiny--tiny/tokenized/tiny/tiny").iterdir()
    first = load_from_disk(str(folder / "dataset"))[0]["input_ids"]
    assert AutoTokenizer.from_pretrained(tiny_model_dir).decode(first).startswith(prompt_start)
