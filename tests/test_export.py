"""The GGUF export through Snakemake on a tiny Llama, checked in llama.cpp (llama-cpp-python).

The tiny model has SmolLM2's tokenizer (data/tokenizers/smollm2): llama.cpp's converter identifies a
BPE pre-tokenizer by its output, and the fixtures' own tokenizer is one it does not know.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import copy_workflow, demo_records, results_dir, snakemake, write_jsonl
from loragrid.common import LoragridError
from loragrid.export import (
    _check_type,
    _questions,
    check_exportable,
    convert,
    export_settings,
    llama_cpp_answers,
    verify_exports,
)
from loragrid.modeling import PICKLED_MODEL

EXPERIMENT = "tiny-smollm2--tiny"
TYPES = ["f16", "q8_0", "q4_k_m"]
# One run: a full run's export reads its model folder as a LoRA run's reads its merged one (the dry run below
# checks the wiring), and a second run was about 22 CPU-seconds of the suite (train, generate, evaluate, export).
RUNS = ["lora"]
# Hidden size 256: the q4_k_m blocks are 256 wide, so llama.cpp's quantizer uses Q4_K itself.
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
    "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "torch_dtype": "float32",
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}


def export_config(workdir, **overrides):
    (workdir / "tiny-llama.json").write_text(json.dumps(TINY_LLAMA))
    write_jsonl(workdir / "tiny.jsonl", demo_records(48))
    config = {
        "model": {"name": "tiny-smollm2", "source": "random:tiny-llama.json", "tokenizer": "data/tokenizers/smollm2"},
        "dataset": {"name": "tiny", "source": "local:tiny.jsonl"},
        "split": {"heldout_min": 8},
        "training": {"max_steps": 2, "micro_batch_size": 4, "lora_r": 4, "lora_alpha": 8, "cutoff_len": 96},
        "grid": {"method": RUNS},
        "generate": {"max_new_tokens": 16, "batch_size": 8},
        "export": {"enabled": True, "types": TYPES},
        "torch_threads": 1,
        "benchmarks": {"tasks": []},
    }
    config.update(overrides)
    path = workdir / "export.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_export_workflow(root):
    """The whole DAG with the export on: (workflow folder, config file). conftest starts it with the session."""
    workdir = copy_workflow(root / "workflow")
    config = export_config(workdir)
    result = snakemake(workdir, "all", "--configfile", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir, config


@pytest.fixture(scope="module")
def export_workflow(background_workflows):
    return background_workflows["export"].result()


def test_every_run_is_exported_and_agrees_with_transformers(export_workflow):
    from gguf import GGUFReader

    workdir, _ = export_workflow
    gguf_dir = results_dir(workdir, EXPERIMENT) / "gguf"
    for run in RUNS:
        summary = verify_exports(gguf_dir / f"{run}.json")
        assert summary["architecture"] == "LlamaForCausalLM"
        assert summary["converter"]["source"] == "pypi:llama-cpp-python==0.3.36"
        assert list(summary["types"]) == TYPES
        records = summary["types"]
        # 8 held-out questions, 16 compared tokens each unless an answer ended sooner.
        assert 0 < records["f16"]["compared_tokens"] <= 8 * 16
        assert records["f16"]["agreement"] >= 0.95 and records["q8_0"]["agreement"] >= 0.9
        assert records["q4_k_m"]["agreement"] >= 0.7
        assert all(r["emoji_share_difference"] <= 0.05 for r in records.values())
        assert records["f16"]["bytes"] > records["q8_0"]["bytes"] > records["q4_k_m"]["bytes"]
        for gguf_type in TYPES:
            answers = [json.loads(line) for line in (gguf_dir / f"{run}-{gguf_type}.answers.jsonl").open()]
            assert len(answers) == 8 and all("transformers_answer" in a for a in answers)
    # GGUFReader parses every field (SmolLM2's 49,152 tokens too) in Python: one run's files suffice.
    for gguf_type in TYPES:
        reader = GGUFReader(gguf_dir / f"lora-{gguf_type}.gguf")
        fields = {name: field.contents() for name, field in reader.fields.items()
                  if name in ("general.architecture", "general.file_type", "tokenizer.ggml.pre")}
        # llama.cpp's file types: 1 MOSTLY_F16, 7 MOSTLY_Q8_0, 15 MOSTLY_Q4_K_M
        assert fields == {"general.architecture": "llama", "tokenizer.ggml.pre": "smollm",
                          "general.file_type": {"f16": 1, "q8_0": 7, "q4_k_m": 15}[gguf_type]}


def test_a_gguf_source_fetches_through_snakemake_as_safetensors(export_workflow, tmp_path):
    """The gguf: source through Snakemake's fetch_model rule, as a user's config reaches it, on the LoRA run's
    q8_0 export (transformers dequantizes it; the embedded model's Q4_1 GGUF takes the same path through the
    pypi: source in tests/test_real_model.py)."""
    from transformers import AutoModelForCausalLM

    exported, _ = export_workflow
    gguf = results_dir(exported, EXPERIMENT) / "gguf/lora-q8_0.gguf"
    workdir = copy_workflow(tmp_path / "workflow")
    (workdir / "gguf.yaml").write_text(yaml.safe_dump({"model": {"name": "smol", "source": f"gguf:{gguf}"}}))
    result = snakemake(workdir, "resources/models/smol", "--configfile", "gguf.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    model_dir = workdir / "resources/models/smol"
    provenance = json.loads((model_dir / "source.json").read_text())
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())
    assert list(model_dir.glob("*.safetensors"))
    assert provenance["files"]["config.json"] and provenance["gguf_sha256"]
    assert provenance["source"] == f"gguf:{gguf}"
    exported_model = AutoModelForCausalLM.from_pretrained(results_dir(exported, EXPERIMENT) / "runs/lora/merged")
    fetched = AutoModelForCausalLM.from_pretrained(model_dir)
    assert sum(p.numel() for p in fetched.parameters()) == sum(p.numel() for p in exported_model.parameters())


def test_modelfile_carries_the_chat_template(export_workflow):
    workdir, _ = export_workflow
    text = (results_dir(workdir, EXPERIMENT) / "gguf" / "lora-q8_0.Modelfile").read_text()
    assert "FROM ./lora-q8_0.gguf\n" in text
    # SmolLM2's chat template, rendered by the code that rendered the training prompts.
    assert re.search(r'TEMPLATE """<\|im_start\|>system\n.*<\|im_end\|>\n<\|im_start\|>user\n\{\{ \.Prompt \}\}'
                     r'<\|im_end\|>\n<\|im_start\|>assistant\n"""', text)
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0" in text


def test_report_lists_the_files_and_llama_cpp_answers(export_workflow):
    workdir, _ = export_workflow
    report = results_dir(workdir, EXPERIMENT) / "report"
    markdown = (report / "report.md").read_text()
    section = markdown.split("## Exported GGUF files")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and ".gguf" in line]
    assert len(rows) == len(RUNS) * len(TYPES)
    assert re.search(r"\| lora +\| f16 +\| lora-f16\.gguf +\| \d+\.\d +\| \d+\.\d% \(\d+/\d+\)", section)
    assert "lora (llama.cpp q8_0)" in (report / "samples.html").read_text()


def test_the_check_compares_plain_greedy_answers_whatever_generate_penalizes(export_workflow):
    """llama.cpp answers without generate's repetition penalty, for top-1 agreement compares its tokens with
    transformers' plain top-1 token: with the penalty a file that converts perfectly scored below its limit.
    Penalized answers are then no reference for the emoji share, and a stop token is no answer token."""
    import torch

    from loragrid.modeling import load_causal_lm
    from loragrid.tokenized import load_tokenizer

    workdir, _ = export_workflow
    results = results_dir(workdir, EXPERIMENT)
    merged = results / "runs/lora/merged"
    tokenizer = load_tokenizer(merged)
    questions = _questions(tokenizer, "chat", results / "data/tiny/heldout.jsonl", results / "generations/lora.jsonl")
    generate = {"do_sample": False, "max_new_tokens": 16, "repetition_penalty": 5.0}  # enough to move this model
    settings = export_settings({"check_tokens": 16}, generate, threads=1)
    assert settings["greedy"] is False
    gguf = results / "gguf/lora-f16.gguf"
    # The tiny model seldom ends an answer within 16 tokens: one of its own tokens stands in for a stop token.
    first, _ = llama_cpp_answers(gguf, questions["prompts"][:1], 16, questions["stop_ids"], 1)
    stop = first[0][2]
    questions["stop_ids"] = [*questions["stop_ids"], stop]
    model = load_causal_lm(merged, torch.float32).eval()
    result, rows = _check_type(gguf, model, tokenizer, questions, settings)
    assert result["agreement"] >= 0.95, result
    answers, _ = llama_cpp_answers(gguf, questions["prompts"], 16, questions["stop_ids"], 1)
    assert rows[0]["finished"] and rows[0]["new_tokens"] == first[0].index(stop), rows[0]
    for row, answer in zip(rows, answers):
        assert row["new_tokens"] == len(answer) - row["finished"], (row, answer)


def test_a_second_run_exports_nothing_again(export_workflow):
    workdir, config = export_workflow
    result = snakemake(workdir, "all", "--configfile", str(config), "-n")
    assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr


def test_a_full_run_is_exported_from_its_model_folder(export_workflow):
    """The export DAG trains LoRA only: a full run's export job, planned, reads the run's model folder."""
    workdir, config = export_workflow
    result = snakemake(workdir, "all", "--configfile", str(config), "--config", "grid={method: [full, lora]}", "-n")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    inputs = re.findall(r"rule export:\n    input: (.*)\n", output)
    assert [line.split(", ")[0] for line in inputs] == [f"results/{EXPERIMENT}/runs/full/model"], output[-3000:]


def test_a_changed_gguf_fails_the_report(export_workflow, tmp_path):
    source, config = export_workflow
    workdir = tmp_path / "workflow"
    shutil.copytree(source, workdir, symlinks=True)
    gguf = results_dir(workdir, EXPERIMENT) / "gguf" / "lora-q8_0.gguf"
    with gguf.open("r+b") as handle:
        handle.truncate(1000)
    result = snakemake(workdir, "all", "--configfile", str(config), "--forcerun", "report")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    named = (f"{gguf.relative_to(workdir)}: missing or not the", "lora-q8_0.gguf: missing or not the")
    assert any(message in output for message in named)


def test_an_interrupted_export_leaves_no_file_and_is_redone(export_workflow, tmp_path):
    source, config = export_workflow
    workdir = tmp_path / "workflow"
    shutil.copytree(source, workdir, symlinks=True)
    gguf_dir = results_dir(workdir, EXPERIMENT) / "gguf"
    target = str((gguf_dir / "lora.json").relative_to(workdir))
    command = [sys.executable, "-m", "snakemake", "--cores", "1", target, "--configfile", str(config),
               "--forcerun", "export"]
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    # Killed outright (as by the OOM killer) once the converter has begun writing into the staging folder.
    while not list(gguf_dir.glob(".lora.tmp-*/*.gguf")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    caught = list(gguf_dir.glob(".lora.tmp-*/*.gguf"))
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert caught, "the export was not caught while converting:\n" + (tmp_path / "killed.log").read_text()[-3000:]
    assert not list(gguf_dir.glob("lora-*")) and not (gguf_dir / "lora.json").exists()
    snakemake(workdir, "--unlock", "--configfile", str(config))
    # The export itself, asked for by name: Snakemake does not re-make an intermediate output that a
    # finished report was made from (as with temp() files), so `all` would not notice it is gone.
    result = snakemake(workdir, target, "--configfile", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not list(gguf_dir.glob(".lora.tmp-*"))
    assert "left by a job that was killed" in (workdir / "logs" / EXPERIMENT / "export/lora.log").read_text()
    verify_exports(gguf_dir / "lora.json")


def test_an_architecture_the_converter_lacks_is_named(export_workflow, tmp_path):
    workdir, _ = export_workflow
    converter = workdir / "resources/tools/llama.cpp-0.3.36"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["OPTForCausalLM"], "model_type": "opt"}))
    with pytest.raises(LoragridError, match=r"config key 'export\.enabled': llama\.cpp's converter \(from "
                                            r"pypi:llama-cpp-python==0\.3\.36\) does not support the architecture "
                                            r"OPTForCausalLM"):
        check_exportable(tmp_path, converter, "run lora")


def test_a_pruned_pickled_model_is_named(export_workflow, tmp_path):
    workdir, _ = export_workflow
    (tmp_path / PICKLED_MODEL).write_bytes(b"")
    with pytest.raises(LoragridError, match=r"config key 'export\.enabled': run full comes from a pruned model kept "
                                            r"as a pickle"):
        check_exportable(tmp_path, workdir / "resources/tools/llama.cpp-0.3.36", "run full")


def test_a_tokenizer_the_converter_does_not_know_is_named(export_workflow, tiny_model_dir, tmp_path):
    """The fixtures' tiny Llama has a BPE tokenizer trained on the demo data: no pre-tokenizer llama.cpp knows."""
    workdir, _ = export_workflow
    with pytest.raises(LoragridError, match=r"config key 'export\.enabled': llama\.cpp's converter could not convert "
                                            r"its tokenizer \(llama\.cpp does not know its pre-tokenizer\)"):
        convert(tiny_model_dir, workdir / "resources/tools/llama.cpp-0.3.36", tmp_path / "tiny.gguf", "f16")


def test_an_architecture_the_converter_lacks_fails_before_training(tmp_path):
    """A tiny random OPT (transformers has it, llama.cpp's converter does not): once the model and the
    converter are fetched, Snakemake refuses the workflow before any job."""
    workdir = copy_workflow(tmp_path / "workflow")
    opt = {"architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": 49152, "hidden_size": 64,
           "ffn_dim": 128, "word_embed_proj_dim": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
           "max_position_embeddings": 512, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
           "pad_token_id": 2}
    config = export_config(workdir, grid={"method": ["lora"]})
    (workdir / "tiny-llama.json").write_text(json.dumps(opt))  # the config's model source, now an OPT
    fetched = snakemake(workdir, "resources/models/tiny-smollm2", "resources/tools/llama.cpp-0.3.36",
                        "--configfile", str(config))
    assert fetched.returncode == 0, fetched.stdout[-3000:] + fetched.stderr[-3000:]
    result = snakemake(workdir, "all", "--configfile", str(config))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert ("config key 'export.enabled': llama.cpp's converter (from pypi:llama-cpp-python==0.3.36) does not "
            "support the architecture OPTForCausalLM of resources/models/tiny-smollm2") in output
    assert not (results_dir(workdir, EXPERIMENT) / "runs").exists()
