"""Model and dataset sources through the libraries' real offline paths, re-fetching, and pickled models.

No hub is reachable from the tests, so each hub test builds the library's own cache layout from
files the test makes and runs the real download function with the library's offline switch:
huggingface_hub with HF_HUB_OFFLINE=1 (it reads HF_HUB_CACHE and HF_HUB_OFFLINE when imported,
so the fetch runs in a fresh process), ModelScope with `local_files_only` (config key `offline`;
ModelScope has no offline environment variable) and MODELSCOPE_CACHE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, demo_records, write_jsonl
from loragrid.common import LoragridError, checksums, read_json, read_jsonl, sha256_file
from loragrid.fetch import fetch_dataset, fetch_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fetch_in_fresh_process(call: str, env: dict) -> subprocess.CompletedProcess:
    """Run `call` (a loragrid.fetch call) in a new Python with `env` added, as a Snakemake job would."""
    code = f"from loragrid.fetch import fetch_model, fetch_dataset\nimport json\nprint(json.dumps({call}))"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO), **env})


def hf_cache(root: Path, repo_type: str, repo: str, files: dict[str, Path | bytes]) -> Path:
    """huggingface_hub's cache layout: {type}s--org--name/refs/main -> snapshots/<commit>/files."""
    folder = root / f"{repo_type}s--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    for name, content in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(content.read_bytes() if isinstance(content, Path) else content)
    return snapshot


def modelscope_cache(root: Path, repo_type: str, repo: str, files: dict[str, Path | bytes],
                     revision: str = "master") -> Path:
    """ModelScope's cache layout (modelscope >= 1.38): {type}s/org--name/snapshots/<revision>/files, the
    revision as it was asked for (a branch, tag or commit); no commit is kept for a branch."""
    snapshot = root / f"{repo_type}s" / repo.replace("/", "--") / "snapshots" / revision
    for name, content in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(content.read_bytes() if isinstance(content, Path) else content)
    return snapshot


def model_files(model_dir: Path) -> dict[str, Path]:
    files = {p.name: p for p in model_dir.iterdir() if p.is_file()}
    files["pytorch_model.bin"] = b"pickled weights that must never be copied"
    return files


def parquet_bytes(records: list[dict], tmp_path: Path) -> bytes:
    from datasets import Dataset

    Dataset.from_list(records).to_parquet(str(tmp_path / "tmp.parquet"))
    return (tmp_path / "tmp.parquet").read_bytes()


def test_hf_model_resolved_offline_by_snapshot_download(tmp_path, tiny_model_dir):
    snapshot = hf_cache(tmp_path / "hub", "model", "acme/tiny-chat", model_files(tiny_model_dir))
    out = tmp_path / "model"
    result = fetch_in_fresh_process(f"fetch_model('hf:acme/tiny-chat', {str(out)!r})",
                                    {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    provenance = json.loads(result.stdout.strip().splitlines()[-1])
    assert provenance["resolved_path"] == str(snapshot)  # snapshot_download found the cached commit
    assert provenance["revision"] == "main" and provenance["repo"] == "acme/tiny-chat"
    assert provenance["commit"] == COMMIT  # what refs/main pointed to: "main" alone names no fixed files
    assert read_json(out / "source.json")["commit"] == COMMIT
    assert not (out / "pytorch_model.bin").exists()
    assert checksums(out)["model.safetensors"] == checksums(tiny_model_dir)["model.safetensors"]
    assert read_json(out / "source.json")["files"] == {k: v for k, v in checksums(out).items() if k != "source.json"}


def test_hf_model_at_a_revision_that_is_not_cached(tmp_path, tiny_model_dir):
    hf_cache(tmp_path / "hub", "model", "acme/tiny-chat", model_files(tiny_model_dir))
    result = fetch_in_fresh_process(f"fetch_model('hf:acme/tiny-chat@v2', {str(tmp_path / 'model')!r})",
                                    {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "LoragridError: config key 'model.source': hf could not resolve 'acme/tiny-chat@v2'" in result.stderr
    assert not (tmp_path / "model").exists()


def test_hf_dataset_resolved_offline_and_read_by_datasets(tmp_path):
    records = demo_records(40)
    snapshot = hf_cache(tmp_path / "hub", "dataset", "acme/emoji", {
        "README.md": b"# a dataset card, not data",
        "data/train-00000-of-00002.parquet": parquet_bytes(records[:25], tmp_path),
        "data/train-00001-of-00002.parquet": parquet_bytes(records[25:], tmp_path),
    })
    out = tmp_path / "dataset"
    result = fetch_in_fresh_process(f"fetch_dataset('hf:acme/emoji', {str(out)!r})",
                                    {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
                                     "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    provenance = json.loads(result.stdout.strip().splitlines()[-1])
    assert provenance["resolved_path"] == str(snapshot) and provenance["commit"] == COMMIT
    assert [(p["file"], p["count"], p["unit"]) for p in provenance["parts"]] == [
        ("hf:acme/emoji/data/train-00000-of-00002.parquet", 25, "row"),
        ("hf:acme/emoji/data/train-00001-of-00002.parquet", 15, "row"),
    ]
    assert read_jsonl(out / "records.jsonl") == records


def test_modelscope_model_and_dataset_resolved_offline(tmp_path, tiny_model_dir, monkeypatch):
    cache = tmp_path / "modelscope"
    model_snapshot = modelscope_cache(cache, "model", "Qwen/Tiny-Instruct", model_files(tiny_model_dir))
    records = demo_records(40)
    data_snapshot = modelscope_cache(cache, "dataset", "shareAI/emoji", {
        "emoji.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()})
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))

    model = fetch_model("modelscope:Qwen/Tiny-Instruct", tmp_path / "model", offline=True)
    assert model["resolved_path"] == str(model_snapshot) and model["revision"] == "master"
    assert model["commit"] is None  # ModelScope's cache keeps no commit for a branch
    assert ((tmp_path / "model" / "model.safetensors").exists()
            and not (tmp_path / "model" / "pytorch_model.bin").exists())

    dataset = fetch_dataset("modelscope:shareAI/emoji", tmp_path / "dataset", offline=True)
    assert dataset["resolved_path"] == str(data_snapshot) and dataset["commit"] is None
    assert dataset["parts"][0]["file"] == "modelscope:shareAI/emoji/emoji.jsonl"
    assert read_jsonl(tmp_path / "dataset" / "records.jsonl") == records

    # A revision pinned to a commit is the snapshot's folder name: that commit's files.
    pinned = modelscope_cache(cache, "dataset", "shareAI/emoji", {"emoji.jsonl": (data_snapshot / "emoji.jsonl")},
                              revision=COMMIT)
    dataset = fetch_dataset(f"modelscope:shareAI/emoji@{COMMIT}", tmp_path / "pinned", offline=True)
    assert dataset["resolved_path"] == str(pinned) and dataset["revision"] == dataset["commit"] == COMMIT


def test_modelscope_cache_miss_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "empty"))
    with pytest.raises(LoragridError, match=r"config key 'dataset.source': modelscope could not resolve 'org/none'"
                                            r".*Cannot find cached"):
        fetch_dataset("modelscope:org/none", tmp_path / "dataset", offline=True)
    assert not (tmp_path / "dataset").exists()


def test_a_second_fetch_does_nothing_and_a_changed_source_refetches(tmp_path, caplog):
    first = write_jsonl(tmp_path / "a.jsonl", demo_records(40))
    second = write_jsonl(tmp_path / "b.jsonl", demo_records(45))
    out = tmp_path / "dataset"
    fetch_dataset(f"local:{first}", out)
    stamp = (out / "source.json").stat().st_mtime_ns
    caplog.set_level("INFO")
    fetch_dataset(f"local:{first}", out)
    assert (out / "source.json").stat().st_mtime_ns == stamp and "nothing to fetch" in caplog.text

    fetch_dataset(f"local:{second}", out)
    assert (read_json(out / "source.json")["source"] == f"local:{second}"
            and len(read_jsonl(out / "records.jsonl")) == 45)

    write_jsonl(second, demo_records(46))  # the same source, edited
    fetch_dataset(f"local:{second}", out)
    assert len(read_jsonl(out / "records.jsonl")) == 46

    (out / "records.jsonl").write_text("tampered\n")  # no longer matches source.json's checksum
    fetch_dataset(f"local:{second}", out)
    assert len(read_jsonl(out / "records.jsonl")) == 46


def _pickled_model(tmp_path, tiny_model_dir, prune: bool = False) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if prune:  # what structured pruning does: a layer's MLP loses channels its config knows nothing of
        mlp = model.model.layers[1].mlp
        mlp.gate_proj = torch.nn.Linear(64, 96, bias=False)
        mlp.up_proj = torch.nn.Linear(64, 96, bias=False)
        mlp.down_proj = torch.nn.Linear(96, 64, bias=False)
    path = tmp_path / ("pruned.bin" if prune else "model.bin")
    torch.save({"model": model, "tokenizer": AutoTokenizer.from_pretrained(tiny_model_dir)}, path)
    return path


def test_pickled_model_only_with_allow_pickle(tmp_path, tiny_model_dir):
    path = _pickled_model(tmp_path, tiny_model_dir)
    with pytest.raises(LoragridError,
                       match=r"config key 'model.source': .*model\.bin is a pickle.*allow_pickle: true"):
        fetch_model(f"torch:{path}", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    provenance = fetch_model(f"torch:{path}", tmp_path / "out", allow_pickle=True)
    assert provenance["source_sha256"] == sha256_file(path) and (tmp_path / "out" / "model.safetensors").exists()
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "model.safetensors")
    original = load_file(tiny_model_dir / "model.safetensors")
    assert all((saved[name] == original[name]).all() for name in original)


def test_a_pruned_pickled_model_trains_merges_and_generates(tmp_path, tiny_model_dir, prepared_dir):
    """Pruned layers (shapes no config.json describes) stay a pickle that every stage loads."""
    import torch

    from conftest import TINY_RUN
    from loragrid import modeling
    from loragrid.merge import merge
    from loragrid.train import train

    base = tmp_path / "base"
    fetch_model(f"torch:{_pickled_model(tmp_path, tiny_model_dir, prune=True)}", base, allow_pickle=True)
    assert (base / modeling.PICKLED_MODEL).exists() and not list(base.glob("*.safetensors"))
    assert modeling.load_for_inference(base).model.layers[1].mlp.up_proj.out_features == 96

    summary = train(base, prepared_dir, tmp_path / "adapter", TINY_RUN, "chat")
    assert summary["steps"] == 3
    merge(base, tmp_path / "adapter", tmp_path / "merged", prepared_dir / "heldout.jsonl", "chat", "lora")
    merged = modeling.load_for_inference(tmp_path / "merged", dtype=torch.float32)
    assert merged.model.layers[1].mlp.down_proj.in_features == 96

    train(base, prepared_dir, tmp_path / "full", {**TINY_RUN, "method": "full"}, "chat")
    assert modeling.load_for_inference(tmp_path / "full").model.layers[1].mlp.gate_proj.out_features == 96

    with pytest.raises(LoragridError,
                       match=r"config key 'method': qlora4 quantizes weights .* trains with full or lora only"):
        train(base, prepared_dir, tmp_path / "q", {**TINY_RUN, "method": "qlora4"}, "chat")


def test_a_pickled_base_gets_its_merged_model_back_as_a_pickle(tmp_path, tiny_model_dir, prepared_dir):
    import torch

    from conftest import TINY_RUN
    from loragrid.merge import merge
    from loragrid.modeling import PICKLED_MODEL
    from loragrid.train import train

    fetch_model(f"torch:{_pickled_model(tmp_path, tiny_model_dir)}", tmp_path / "base", allow_pickle=True)
    train(tmp_path / "base", prepared_dir, tmp_path / "adapter", TINY_RUN, "chat")
    summary = merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", prepared_dir / "heldout.jsonl",
                    "chat", "lora")
    assert summary["pickled_model"] == PICKLED_MODEL
    loaded = torch.load(tmp_path / "merged" / PICKLED_MODEL, weights_only=False)
    assert set(loaded) == {"model", "tokenizer"}
    ids = torch.tensor([loaded["tokenizer"]("Why is the sky blue?")["input_ids"]])
    from transformers import AutoModelForCausalLM

    from_folder = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(loaded["model"](ids).logits, from_folder(ids).logits)
