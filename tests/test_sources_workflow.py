"""Each model and dataset source through the real fetch rules of Snakemake, offline, as a user runs them.

The hub caches are built in the libraries' own layouts (see test_sources.py); Snakemake's jobs
inherit HF_HUB_CACHE / MODELSCOPE_CACHE from its environment, and `offline: true` makes both
libraries read their caches only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import demo_records
from loragrid.common import read_json, read_jsonl
from test_sources import _pickled_model, hf_cache, model_files, modelscope_cache


def _records_bytes(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def _hub(scheme, root, tiny_model_dir, records):
    """(model source, dataset source, environment) for a hub whose cache lives under `root`."""
    if scheme == "hf":
        hf_cache(root, "model", "acme/tiny-chat", model_files(tiny_model_dir))
        hf_cache(root, "dataset", "acme/emoji", {"emoji.jsonl": _records_bytes(records)})
        return "hf:acme/tiny-chat", "hf:acme/emoji", {"HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1"}
    modelscope_cache(root, "model", "Qwen/Tiny-Instruct", model_files(tiny_model_dir))
    modelscope_cache(root, "dataset", "shareAI/emoji", {"emoji.jsonl": _records_bytes(records)})
    return "modelscope:Qwen/Tiny-Instruct", "modelscope:shareAI/emoji", {"MODELSCOPE_CACHE": str(root)}


@pytest.mark.parametrize("scheme", ["hf", "modelscope", "torch"])
def test_a_source_fetches_and_prepares_through_snakemake(copy_repo, tiny_model_dir, tmp_path, scheme):
    records = demo_records(48)
    model = {"name": "tiny"}
    if scheme == "torch":
        model.update(source=f"torch:{_pickled_model(tmp_path, tiny_model_dir)}", allow_pickle=True)
        (copy_repo / "d.jsonl").write_bytes(_records_bytes(records))
        dataset, env = "local:d.jsonl", {}
    else:
        model["source"], dataset, env = _hub(scheme, tmp_path / "cache", tiny_model_dir, records)
    config = {"model": model, "dataset": {"name": "tiny", "source": dataset}, "offline": True,
              "split": {"heldout_min": 8}}
    (copy_repo / "c.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", "resources/models/tiny",
         "results/tiny--tiny/data/tiny/prepare.json", "--configfile", "c.yaml"],
        cwd=copy_repo, capture_output=True, text=True, timeout=600, env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fetched = read_json(copy_repo / "resources/models/tiny/source.json")
    assert fetched["source"] == model["source"] and (copy_repo / "resources/models/tiny/model.safetensors").exists()
    assert not list((copy_repo / "resources/models/tiny").glob("*.bin"))
    assert read_jsonl(copy_repo / "resources/datasets/tiny/records.jsonl") == records
    assert read_json(copy_repo / "results/tiny--tiny/data/tiny/prepare.json")["records_valid"] == 48


def test_a_file_edited_in_a_local_folder_source_fetches_again(copy_repo, tiny_model_dir, fetched_tiny_model):
    """A folder's mtime stays when a file in it is rewritten in place: before 2026-12-07 an edited chat template
    or data file in a local: folder re-ran nothing, and the stale results stood."""
    import shutil

    from conftest import snakemake, tiny_config, with_fetched_model, write_jsonl

    data = copy_repo / "data" / "mine"
    data.mkdir()
    write_jsonl(data / "part1.jsonl", demo_records(48))
    model = shutil.copytree(tiny_model_dir, copy_repo / "data" / "tiny-model")
    config = tiny_config(copy_repo, model, dataset={"name": "mine", "source": "local:data/mine"})
    with_fetched_model(copy_repo, fetched_tiny_model)
    fetched = snakemake(copy_repo, "resources/datasets/mine", "--configfile", str(config))
    assert fetched.returncode == 0, fetched.stdout[-3000:] + fetched.stderr[-3000:]
    targets = ["resources/models/tiny", "resources/datasets/mine", "--configfile", str(config), "--dry-run"]
    unchanged = snakemake(copy_repo, *targets)
    assert "Nothing to be done" in unchanged.stdout + unchanged.stderr

    folders = {folder: os.stat(folder).st_mtime_ns for folder in (data, model)}
    with open(data / "part1.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"question": "Is this new?", "answer_en": "Yes 🆕"}, ensure_ascii=False) + "\n")
    (model / "chat_template.jinja").write_text((model / "chat_template.jinja").read_text().replace("assistant", "bot"))
    assert {folder: os.stat(folder).st_mtime_ns for folder in folders} == folders  # edited in place
    planned = snakemake(copy_repo, *targets)
    output = planned.stdout + planned.stderr
    assert "reason: Updated input files: data/mine/part1.jsonl" in output
    assert f"reason: Updated input files: {model}/chat_template.jinja" in output
