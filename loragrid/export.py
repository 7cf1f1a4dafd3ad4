"""export: GGUF files of a full or merged run, made by llama.cpp's own converter and checked in llama.cpp.

The converter (convert_hf_to_gguf.py with its `conversion` package and its own gguf-py) comes from
the llama-cpp-python sdist of the installed version: the wheel does not ship it, and the gguf 0.19.0
on PyPI is older than the gguf-py the converter is written against, though both say 0.19.0. The
check answers the held-out questions in llama.cpp (llama-cpp-python) and compares its tokens with
transformers' top-1 tokens on the same merged model.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

from .common import (
    LoragridError,
    _staging_path,
    atomic_dir,
    read_json,
    read_jsonl,
    sha256_file,
    verify_folder,
    write_json,
    write_jsonl,
)

log = logging.getLogger("loragrid.export")

# Types the converter writes itself, and those llama.cpp's quantizer (llama_model_quantize) makes from f16.
CONVERTER_TYPES = ("f16", "q8_0")
QUANTIZED_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
TYPES = (*CONVERTER_TYPES, *QUANTIZED_TYPES)
PACKAGE = "llama-cpp-python"
# What the workflow keeps of the sdist: the converter, the modules it imports, the gguf-py it puts on its path.
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
# The converter imports sentencepiece for Llama-family models even when they have a BPE tokenizer.
REQUIRED = (PACKAGE, "sentencepiece")
INSTALL_HINT = (f"`make install-test` installs them, or pip install {PACKAGE}==0.3.36 sentencepiece==0.2.3 "
                "(llama-cpp-python compiles llama.cpp: it needs a C/C++ compiler, e.g. apt-get install gcc g++)")


def llama_cpp_version(required: bool = True) -> str | None:
    """The installed llama-cpp-python's version; where the export is on without it (or without
    sentencepiece), an error that says how to install them."""
    missing = []
    for name in REQUIRED:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing and required:
        raise LoragridError(f"config key 'export.enabled': the GGUF export needs {' and '.join(missing)}, not "
                            f"installed here; {INSTALL_HINT}")
    return None if PACKAGE in missing else metadata.version(PACKAGE)


def export_settings(export: dict, generate: dict, threads: int) -> dict:
    """What export_run needs: the export section, generate's length, the job's threads, and whether generate's
    answers are plain greedy ones (no sampling, beams or repetition rules), the only reference for the emoji share."""
    greedy = (not generate["do_sample"] and generate.get("num_beams", 1) == 1
              and generate["repetition_penalty"] == 1 and not generate.get("no_repeat_ngram_size", 0))
    return {**export, "threads": threads, "max_new_tokens": generate["max_new_tokens"], "greedy": greedy,
            "generate": generate}


def fetch_converter(out_dir, version: str) -> dict:
    """Keep llama.cpp's converter from the llama-cpp-python sdist of `version` (pip download checks its hash)."""
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "--progress-bar", "off", "-d", download, f"{PACKAGE}=={version}"]
        result = subprocess.run(command, capture_output=True, text=True)
        sdists = list(Path(download).glob("*.tar.gz"))
        if result.returncode != 0 or not sdists:
            raise LoragridError(f"config key 'export.enabled': pip could not download the {PACKAGE}=={version} sdist "
                                f"that holds llama.cpp's converter:\n{result.stderr.strip()}")
        with tarfile.open(sdists[0]) as archive, atomic_dir(out_dir) as staging:
            prefix = f"{archive.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].split("/")[0] in CONVERTER_FILES and (m.isfile() or m.isdir())]
            for member in members:
                member.name = member.name[len(prefix):]
            archive.extractall(staging, members=members, filter="data")
            source = {"source": f"pypi:{PACKAGE}=={version}", "sdist": sdists[0].name,
                      "sdist_sha256": sha256_file(sdists[0]), "files": len(members)}
            write_json(staging / "source.json", source)
    log.info("llama.cpp's converter from %s kept in %s", sdists[0].name, out_dir)
    return source


def supported_architectures(converter_dir) -> set[str]:
    """The Hugging Face architectures the converter maps to a GGUF model (read, not imported: importing
    it would put its gguf-py in front of the installed gguf)."""
    tree = ast.parse((Path(converter_dir) / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "TEXT_MODEL_MAP":
            return set(ast.literal_eval(node.value))
    raise LoragridError(f"{converter_dir}: no TEXT_MODEL_MAP in conversion/__init__.py; delete {converter_dir} "
                        "and run snakemake again to fetch it")


def check_exportable(model_dir, converter_dir, what: str) -> str:
    """Fail before converting anything where llama.cpp's converter cannot read the model (`what`, e.g.
    'run lora'); its architecture."""
    from .modeling import PICKLED_MODEL, has_pickled_model

    if has_pickled_model(model_dir):
        raise LoragridError(
            f"config key 'export.enabled': {what} comes from a pruned model kept as a pickle ({PICKLED_MODEL}, "
            f"model.source torch:): its layers have shapes no config.json describes, which llama.cpp's converter "
            "cannot read; set export.enabled: false for this model")
    config = read_json(Path(model_dir) / "config.json")
    architectures = config.get("architectures") or [f"(none; model_type {config.get('model_type')!r})"]
    if architectures[0] not in supported_architectures(converter_dir):
        converter = read_json(Path(converter_dir) / "source.json")["source"]
        raise LoragridError(
            f"config key 'export.enabled': llama.cpp's converter (from {converter}) does not support the "
            f"architecture {architectures[0]} of {model_dir}; set export.enabled: false for this model")
    return architectures[0]


def convert(model_dir, converter_dir, outfile: Path, outtype: str) -> None:
    """Run llama.cpp's converter in its own process (its gguf-py must not meet the installed gguf)."""
    command = [sys.executable, str(Path(converter_dir) / "convert_hf_to_gguf.py"), str(model_dir),
               "--outfile", str(outfile), "--outtype", outtype]
    log.info("converting: %s", " ".join(command))
    # Without NO_LOCAL_GGUF the converter puts its own gguf-py first on its path, as it is written to.
    env = {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    sys.stderr.write(result.stdout[-20000:] + result.stderr[-20000:])
    if result.returncode != 0:
        last = [line for line in result.stderr.strip().splitlines() if line.strip()][-1:] or ["(no message)"]
        what = ("its tokenizer (llama.cpp does not know its pre-tokenizer)" if "pre-tokenizer" in result.stderr
                else f"{model_dir}")
        raise LoragridError(f"config key 'export.enabled': llama.cpp's converter could not convert {what}: "
                            f"{last[0].strip()}; set export.enabled: false for this model")


def quantize(source: Path, target: Path, gguf_type: str, threads: int) -> None:
    """llama.cpp's own quantizer (llama-quantize's library call), from the f16 file."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED_TYPES[gguf_type])
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise LoragridError(f"config key 'export.types': llama.cpp could not quantize {source} to {gguf_type} "
                            f"(llama_model_quantize returned {status})")


def llama_cpp_answers(gguf_path: Path, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                      threads: int) -> tuple[list[list[int]], float]:
    """Greedy answers in llama.cpp to the same prompt tokens transformers gets: (answer tokens, each ending with
    its stop token where it has one; answer tokens/s, stop tokens not counted, as generate counts them)."""
    from llama_cpp import Llama
    from tqdm.auto import tqdm

    longest = max(len(prompt) for prompt in prompts) + max_new_tokens + 1
    llm = Llama(model_path=str(gguf_path), n_ctx=max(512, longest), n_threads=threads, n_threads_batch=threads,
                seed=0, verbose=False)
    answers, generated, seconds = [], 0, 0.0
    for prompt in tqdm(prompts, desc=f"llama.cpp {gguf_path.name}", unit="question"):
        started, tokens = time.perf_counter(), []
        # temp 0 is llama.cpp's greedy sampler: the top-1 token at every step, as top1_agreement compares it with
        # transformers' top-1 token. No repetition penalty (llama.cpp's default is 1.1): the check is of the file.
        for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            tokens.append(token)
            if token in stop_ids or len(tokens) >= max_new_tokens:
                break
        seconds += time.perf_counter() - started
        generated += len([token for token in tokens if token not in stop_ids])
        answers.append(tokens)
    llm.close()
    return answers, generated / seconds if seconds else 0.0


def top1_agreement(model, prompts: list[list[int]], answers: list[list[int]], check_tokens: int) -> list[int]:
    """Per question, how many of llama.cpp's first `check_tokens` tokens are transformers' top-1 token
    at the same position, given the same preceding tokens (teacher forcing: one divergence does not
    make every later token differ)."""
    import torch

    agreeing = []
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers):
            compared = answer[:check_tokens]
            ids = torch.tensor([prompt + compared])
            top1 = model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(compared)].argmax(-1)
            agreeing.append(int((top1 == torch.tensor(compared)).sum()))
    return agreeing


def _go_template(text: str) -> str:
    """Literal text for an Ollama (Go) template: `{{` would start an action."""
    return text.replace("{{", '{{ "{{" }}')


def modelfile(tokenizer, template: str, gguf_name: str, run: str, settings: dict) -> str:
    """An Ollama Modelfile: the GGUF, the prompt format the run was trained with (rendered by the same
    code as training, around Ollama's {{ .Prompt }}), the tokens that end an answer as stop words (EOS, and a
    chat template's own end of turn), and generate's settings."""
    from .templates import answer_end_ids, render_prompt

    marker = "\x00PROMPT\x00"
    rendered = render_prompt(tokenizer, template, [{"role": "user", "content": marker}])
    before, _, after = rendered.partition(marker)
    # A tokenizer that puts BOS in front of a text gives the GGUF add_bos_token, and llama.cpp adds it itself: a BOS
    # the template writes (Llama-2's and Mistral's chat templates) would be a second one. SmolLM2's BOS,
    # <|im_start|>, opens every turn and its tokenizer adds none: that one stays.
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    if adds_bos and before.startswith(tokenizer.bos_token):
        before = before[len(tokenizer.bos_token):]
    sampling = ([f"PARAMETER temperature {settings['temperature']}", f"PARAMETER top_p {settings['top_p']}"]
                if settings["do_sample"] else ["PARAMETER temperature 0"])
    return "\n".join([
        f"# Ollama: ollama create {run} -f {gguf_name.removesuffix('.gguf')}.Modelfile  (written by loragrid)",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{_go_template(before)}{{{{ .Prompt }}}}{_go_template(after)}"""',
        *(f"PARAMETER stop {json.dumps(tokenizer.convert_ids_to_tokens(end))}"
          for end in answer_end_ids(tokenizer, template)),
        *sampling,
        f"PARAMETER repeat_penalty {settings['repetition_penalty']}",
        f"PARAMETER num_predict {settings['max_new_tokens']}",
        "",
    ])


def _file_record(path: Path) -> dict:
    stat = path.stat()
    return {"file": path.name, "bytes": stat.st_size, "sha256": sha256_file(path), "mtime_ns": stat.st_mtime_ns}


def verify_exports(summary_path) -> dict:
    """The export summary, once its files are checked: a truncated or changed GGUF is never taken as complete."""
    summary = read_json(summary_path)
    folder = Path(summary_path).parent
    for record in [*summary["types"].values(), *summary["modelfiles"].values()]:
        path = folder / record["file"]
        hint = f"delete {summary_path} and run snakemake again to export it again"
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            raise LoragridError(f"{path}: missing or not the {record['bytes']} bytes the export wrote; {hint}")
        if path.stat().st_mtime_ns != record["mtime_ns"] and sha256_file(path) != record["sha256"]:
            raise LoragridError(f"{path}: changed since the export wrote it (sha256 differs); {hint}")
    return summary


def _check_type(gguf_path: Path, model, tokenizer, questions: dict, settings: dict) -> tuple[dict, list[dict]]:
    """One exported file against transformers: top-1 agreement, emoji share, its answers."""
    from .evaluate import emoji_metrics

    started = time.perf_counter()
    answers, speed = llama_cpp_answers(gguf_path, questions["prompts"], settings["max_new_tokens"],
                                       questions["stop_ids"], settings["threads"])
    agreeing = top1_agreement(model, questions["prompts"], answers, settings["check_tokens"])
    compared = sum(min(len(answer), settings["check_tokens"]) for answer in answers)
    said = [[t for t in answer if t not in questions["stop_ids"]] for answer in answers]  # the stop token is no word
    texts = [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in said]
    emoji_share = emoji_metrics(texts)["emoji_share"]
    result = {
        "agreement": sum(agreeing) / compared if compared else 1.0,
        "agreeing_tokens": sum(agreeing),
        "compared_tokens": compared,
        "emoji_share": emoji_share,
        "emoji_share_difference": abs(emoji_share - questions["transformers_emoji_share"]),
        "llama_cpp_tokens_per_second": speed,
        "check_seconds": time.perf_counter() - started,
    }
    log.info("%s: top-1 agreement %.3f over %d tokens, emoji share %.2f (transformers %.2f)", gguf_path.name,
             result["agreement"], compared, emoji_share, questions["transformers_emoji_share"])
    rows = [{"id": q["id"], "question": q["question"], "answer": text, "new_tokens": len(tokens),
             "finished": len(tokens) < len(answer), "agreeing_tokens": agree, "transformers_answer": reference}
            for q, text, tokens, answer, agree, reference in zip(questions["records"], texts, said, answers, agreeing,
                                                                 questions["transformers_answers"])]
    return result, rows


def _enforce(gguf_type: str, result: dict, settings: dict, greedy: bool) -> None:
    """The check's limits: a file that answers unlike the model it came from is not written."""
    wanted = settings["min_agreement"][gguf_type]
    if not result["agreement"] >= wanted:
        raise LoragridError(f"config key 'export.min_agreement.{gguf_type}': the {gguf_type} GGUF agrees with "
                            f"transformers on {result['agreement']:.1%} of the first {settings['check_tokens']} "
                            f"answer tokens, below {wanted:.0%}; the GGUF files are not written")
    limit = settings["max_emoji_share_difference"][gguf_type]
    # Sampled, beam-searched or penalized generations are no reference for llama.cpp's plain greedy answers.
    if greedy and not result["emoji_share_difference"] <= limit:
        raise LoragridError(f"config key 'export.max_emoji_share_difference.{gguf_type}': the {gguf_type} GGUF's "
                            "emoji share differs from transformers' by "
                            f"{result['emoji_share_difference']:.2f}, more than {limit}; "
                            "the GGUF files are not written")


def _questions(tokenizer, template: str, heldout_path, generations_path) -> dict:
    from .evaluate import emoji_metrics
    from .templates import answer_end_ids, question_text, record_token_ids

    records = read_jsonl(heldout_path)
    generations = {g["id"]: g["answer"] for g in read_jsonl(generations_path)}
    reference = [generations[r["id"]] for r in records]
    return {"records": [{"id": r["id"], "question": question_text(r)} for r in records],
            "prompts": [record_token_ids(tokenizer, template, r) for r in records],
            "stop_ids": answer_end_ids(tokenizer, template),
            "transformers_answers": reference, "transformers_emoji_share": emoji_metrics(reference)["emoji_share"]}


def _make_files(model_dir, converter_dir, staging: Path, run: str, types: list[str], threads: int) -> dict:
    """Every wanted GGUF in `staging`, by the converter or by llama.cpp's quantizer from f16; seconds each."""
    seconds = {}
    for gguf_type in sorted(types, key=lambda t: t not in CONVERTER_TYPES):  # f16 first: q4_k_m is made from it
        started = time.perf_counter()
        path = staging / f"{run}-{gguf_type}.gguf"
        if gguf_type in CONVERTER_TYPES:
            convert(model_dir, converter_dir, path, gguf_type)
        else:
            f16 = staging / f"{run}-f16.gguf"
            if not f16.exists():
                convert(model_dir, converter_dir, f16, "f16")
            quantize(f16, path, gguf_type, threads)
        seconds[gguf_type] = time.perf_counter() - started
    return seconds


def export_run(model_dir, converter_dir, heldout_path, generations_path, summary_path, *, run: str, template: str,
               settings: dict, trust_remote_code: bool = False) -> dict:
    """Export `run` as GGUF files of settings['types'], check each in llama.cpp, then move them into place.

    Everything is written in a staging folder beside the outputs and moved only after every check
    passed, the summary (which records each file's size and sha256) last: an export that dies half-way
    leaves no file under an output's name.
    """
    import torch

    from . import modeling
    from .tokenized import load_tokenizer

    for folder in (model_dir, converter_dir, Path(heldout_path).parent):
        verify_folder(folder)
    architecture = check_exportable(model_dir, converter_dir, f"run {run}")
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    questions = _questions(tokenizer, template, heldout_path, generations_path)
    out_dir = Path(summary_path).parent
    staging = _staging_path(out_dir / run)
    try:
        seconds = _make_files(model_dir, converter_dir, staging, run, settings["types"], settings["threads"])
        model = modeling.load_causal_lm(model_dir, torch.float32, trust_remote_code).eval()
        results = {}
        for gguf_type in settings["types"]:
            path = staging / f"{run}-{gguf_type}.gguf"
            result, rows = _check_type(path, model, tokenizer, questions, settings)
            _enforce(gguf_type, result, settings, settings["greedy"])
            write_jsonl(staging / f"{run}-{gguf_type}.answers.jsonl", rows)
            (staging / f"{run}-{gguf_type}.Modelfile").write_text(
                modelfile(tokenizer, template, path.name, run, settings["generate"]), encoding="utf-8")
            results[gguf_type] = {"type": gguf_type, **result, "export_seconds": seconds[gguf_type]}
        summary = _move_into_place(staging, out_dir, run, results)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary.update(run=run, model_dir=str(model_dir), architecture=architecture,
                   converter=read_json(Path(converter_dir) / "source.json"), llama_cpp_python=llama_cpp_version(),
                   check_tokens=settings["check_tokens"], questions=len(questions["prompts"]),
                   transformers_emoji_share=questions["transformers_emoji_share"])
    write_json(summary_path, summary)
    return summary


def _move_into_place(staging: Path, out_dir: Path, run: str, results: dict) -> dict:
    summary = {"types": {}, "modelfiles": {}, "answers": {}}
    for gguf_type, result in results.items():
        for kind, suffix in (("answers", ".answers.jsonl"), ("modelfiles", ".Modelfile"), ("types", ".gguf")):
            name = f"{run}-{gguf_type}{suffix}"
            os.replace(staging / name, out_dir / name)
            record = _file_record(out_dir / name)
            summary[kind][gguf_type] = {**result, **record} if kind == "types" else record
    return summary
