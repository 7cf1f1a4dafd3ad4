"""Every stage checks the folders it reads against the manifest their writer left, only safetensors
weights load, and a killed job's staging folder is removed by the next job writing that output."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO, TINY_RUN
from loragrid import modeling
from loragrid.chat import load_model
from loragrid.common import MANIFEST, LoragridError, atomic_dir, read_json, verify_folder
from loragrid.evaluate import evaluate
from loragrid.fetch import fetch_model
from loragrid.generate import generate
from loragrid.merge import merge
from loragrid.tokenized import tokenize_to_disk
from loragrid.train import train


@pytest.fixture(scope="module")
def fetched(tmp_path_factory, tiny_model_dir):
    """The tiny model as fetch_model leaves it (source.json and manifest), a LoRA adapter and a tokenized split."""
    folder = tmp_path_factory.mktemp("fetched")
    fetch_model(f"local:{tiny_model_dir}", folder / "model")
    model = modeling.load_causal_lm(folder / "model", modeling.compute_dtype())
    with atomic_dir(folder / "adapter") as staging:
        modeling.add_lora(model, TINY_RUN).save_pretrained(staging)
    return folder


@pytest.fixture(scope="module")
def tokenized(fetched, prepared_dir):
    tokenize_to_disk(fetched / "model", prepared_dir, fetched / "tokenized", TINY_RUN, "chat")
    return fetched / "tokenized"


def damaged_copy(folder, target, name, how):
    """A copy of `folder` whose file `name` was truncated, or had one byte changed (same size)."""
    shutil.copytree(folder, target, copy_function=shutil.copy2)  # copy2 keeps the recorded mtimes
    path = target / name
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    return target


# stage -> how it is called with (model folder, prepared folder, adapter folder, tokenized folder, scratch)
STAGES = {
    "tokenize": lambda model, data, adapter, tokens, tmp: tokenize_to_disk(model, data, tmp / "t", TINY_RUN, "chat"),
    "train": lambda model, data, adapter, tokens, tmp: train(model, data, tmp / "r", TINY_RUN, "chat",
                                                             tokenized_dir=tokens),
    "merge": lambda model, data, adapter, tokens, tmp: merge(model, adapter, tmp / "m", data / "heldout.jsonl",
                                                             "chat", "lora"),
    "generate": lambda model, data, adapter, tokens, tmp: generate(model, data / "heldout.jsonl", tmp / "a.jsonl",
                                                                   tmp / "a.json", "chat", {"seed": 0}),
    "evaluate": lambda model, data, adapter, tokens, tmp: evaluate(model, data / "heldout.jsonl", tmp / "a.jsonl",
                                                                   tmp / "a.json", "chat"),
    "chat": lambda model, data, adapter, tokens, tmp: load_model(model, adapter, load_in_4bit=False),
}
READS_ADAPTER = ("merge", "chat")
READS_DATA = ("tokenize", "train", "merge", "generate", "evaluate")


@pytest.mark.parametrize("how", ["truncated", "changed"])
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_names_a_damaged_model_file(fetched, tokenized, prepared_dir, tmp_path, stage, how):
    model = damaged_copy(fetched / "model", tmp_path / "model", "model.safetensors", how)
    message = r"\d+ bytes, \d+ when it was written" if how == "truncated" else "changed since it was written"
    with pytest.raises(LoragridError,
                       match=rf"model\.safetensors: {message}.*; delete {model} and run snakemake again"):
        STAGES[stage](model, prepared_dir, fetched / "adapter", tokenized, tmp_path)


@pytest.mark.parametrize("stage", READS_ADAPTER)
def test_stages_that_read_an_adapter_name_a_damaged_one(fetched, prepared_dir, tmp_path, stage):
    adapter = damaged_copy(fetched / "adapter", tmp_path / "adapter", "adapter_model.safetensors", "changed")
    with pytest.raises(LoragridError, match=r"adapter_model\.safetensors: changed since it was written"):
        STAGES[stage](fetched / "model", prepared_dir, adapter, None, tmp_path)


@pytest.mark.parametrize("stage", READS_DATA)
def test_stages_that_read_the_split_name_a_damaged_one(fetched, tokenized, prepared_dir, tmp_path, stage):
    data = damaged_copy(prepared_dir, tmp_path / "data", "heldout.jsonl", "truncated")
    shutil.copy2(prepared_dir / "train.jsonl", data / "train.jsonl")  # only heldout.jsonl is damaged
    with pytest.raises(LoragridError, match=r"heldout\.jsonl: \d+ bytes, \d+ when it was written"):
        STAGES[stage](fetched / "model", data, fetched / "adapter", tokenized, tmp_path)


def test_training_names_a_damaged_tokenized_split(fetched, tokenized, prepared_dir, tmp_path):
    [arrow] = [p.relative_to(tokenized) for p in tokenized.rglob("*.arrow")]
    damaged = damaged_copy(tokenized, tmp_path / "tokenized", arrow, "changed")
    with pytest.raises(LoragridError, match=rf"{arrow.name}: changed since it was written"):
        train(fetched / "model", prepared_dir, tmp_path / "r", TINY_RUN, "chat", tokenized_dir=damaged)


def test_a_copy_with_new_mtimes_but_the_same_bytes_passes(fetched, tmp_path):
    copy = shutil.copytree(fetched / "model", tmp_path / "model", copy_function=shutil.copyfile)  # new mtimes
    verify_folder(copy)
    assert (os.stat(copy / "model.safetensors").st_mtime_ns
            != read_json(copy / MANIFEST)["files"]["model.safetensors"]["mtime_ns"])


def test_a_pickled_bin_beside_unrelated_safetensors_is_never_loaded(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import save_file

    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = modeling.load_causal_lm(tiny_model_dir, torch.float32).state_dict()
    torch.save(weights, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    save_file({"unrelated": torch.zeros(2)}, folder / "extra.safetensors")
    with pytest.raises(LoragridError,
                       match=r"has no safetensors weights \(model\.safetensors or model\.safetensors\.index\.json"):
        fetch_model(f"local:{folder}", tmp_path / "fetched")
    with pytest.raises(LoragridError, match=rf"{folder}: the weights do not load"):
        modeling.load_causal_lm(folder, torch.float32)


def test_a_pickle_that_loragrid_did_not_write_is_never_loaded(fetched, tmp_path):
    import torch

    folder = shutil.copytree(fetched / "model", tmp_path / "model")
    torch.save({"model": None, "tokenizer": None}, folder / modeling.PICKLED_MODEL)
    with pytest.raises(LoragridError, match=r"a pickle that loragrid did not write .* it is not loaded"):
        modeling.load_causal_lm(folder, torch.float32)


def test_a_job_killed_outright_leaves_staging_that_the_next_job_removes(tmp_path):
    final = tmp_path / "merged"
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom loragrid.common import atomic_dir\n"
         f"with atomic_dir({str(final)!r}) as staging:\n"
         "    (staging / 'model.safetensors').write_bytes(b'x' * 1000)\n"
         "    print('writing', flush=True)\n    time.sleep(120)\n"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    assert writer.stdout.readline().strip() == "writing"
    os.kill(writer.pid, signal.SIGKILL)  # no `finally` runs: the staging folder stays
    writer.wait()
    [stale] = tmp_path.glob(".merged.tmp-*")
    with atomic_dir(final) as staging:
        (staging / "model.safetensors").write_bytes(b"y")
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
