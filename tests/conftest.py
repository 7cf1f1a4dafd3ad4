"""Fixtures: a tiny randomly initialised Llama with its own tokenizer, and small datasets.

Nothing here reaches a model hub: the tokenizer is trained on the shipped demo data and the
model is built from a config, so unit tests run in seconds.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "data" / "emoji_qa.jsonl"

# The tests, their workflow jobs and the background runs share two cores. With torch's default of a
# thread per core, every parallel region spins waiting for a core that another process holds:
# test_train_knobs, test_memory and test_train_merge beside one busy core took 44 CPU-s with two
# threads and 22.5 with one. Workflow jobs take their threads from the config (torch_threads) as ever.
os.environ.setdefault("OMP_NUM_THREADS", "1")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def demo_records(limit: int | None = None) -> list[dict]:
    with open(DEMO_DATA, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return records[:limit] if limit else records


def build_tiny_model(folder: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [r["question"] + " " + r.get("answer_en", r.get("answer_zh", "")) for r in demo_records()]
    tokenizer.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<|endoftext|>", bos_token="<|im_start|>",
        eos_token="<|im_end|>", pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def fetched_tiny_model(tmp_path_factory, tiny_model_dir) -> Path:
    """tiny_model_dir as the fetch_model rule writes it for tiny_config (resources/models/tiny, with source.json)."""
    from loragrid.fetch import fetch_model

    folder = tmp_path_factory.mktemp("fetched") / "tiny"
    fetch_model(f"local:{tiny_model_dir}", folder)
    return folder


def with_fetched_model(workdir: Path, fetched: Path) -> None:
    """The fetched tiny model where fetch_model writes it. Snakemake takes it as done (it is newer than its
    source and has no metadata to compare), so a test about a later stage runs without a fetch job of its
    own (4-5 CPU-s each, mostly transformers' imports); the fetch rule has its own tests."""
    shutil.copytree(fetched, workdir / "resources" / "models" / fetched.name)


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return path


@pytest.fixture
def qa_file(tmp_path) -> Path:
    """60 demo records: enough for a held-out split of 10."""
    return write_jsonl(tmp_path / "qa.jsonl", demo_records(60))


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> Path:
    from loragrid.data import prepare

    folder = tmp_path_factory.mktemp("prepared")
    source = write_jsonl(folder / "qa.jsonl", demo_records(60))
    prepare(source, folder / "data", heldout_min=10)
    return folder / "data"


TINY_RUN = {
    "method": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear",
    "learning_rate": 1e-3, "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "warmup_steps": None, "epochs": 1,
    "max_steps": 3,
    "batch_size": 4, "micro_batch_size": 4, "max_memory_gb": None, "cutoff_len": 128, "train_on_inputs": False,
    "add_eos_token": True, "weight_decay": 0.0, "seed": 0, "group_by_length": True, "packing": False,
    "gradient_checkpointing": False, "optimizer": "adamw_torch", "save_steps": 0, "save_total_limit": 1,
    "lora_bias": "none", "use_rslora": False, "use_dora": False, "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "auto", "report_to": "none", "gpus": 0,
    "compile_layers": False,
}


def copy_workflow(target: Path) -> Path:
    """A copy of the workflow without any results, so a test can run snakemake in its own folder."""
    shutil.copytree(
        REPO, target,
        ignore=shutil.ignore_patterns(".venv", ".git", "results", "resources", "logs", ".snakemake", "__pycache__",
                                      ".pytest_cache"),
    )
    return target


@pytest.fixture
def copy_repo(tmp_path) -> Path:
    return copy_workflow(tmp_path / "workflow")


def snakemake(workdir, *args, timeout=900):
    # Two jobs at a time (tiny_config gives each one torch thread): tiny jobs are mostly interpreter
    # start-up, so the workflow tests take about 40 % less time than one job at a time.
    command = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout)


def results_dir(workdir: Path, experiment: str = "tiny--tiny") -> Path:
    """Where a workflow run in `workdir` writes its results (tiny_config's experiment, MODEL--DATASET, by default)."""
    return workdir / "results" / experiment


def tiny_config(workdir, model_dir, records=None, **overrides):
    data = write_jsonl(workdir / "tiny.jsonl", records if records is not None else demo_records(48))
    config = {
        "model": {"name": "tiny", "source": f"local:{model_dir}"},
        "dataset": {"name": "tiny", "source": f"local:{data.name}"},
        "split": {"heldout_min": 8},
        "training": {"max_steps": 2, "micro_batch_size": 4, "lora_r": 4, "lora_alpha": 8, "cutoff_len": 96},
        "grid": {"method": ["full", "lora", "qlora4", "qlora8"]},
        "generate": {"max_new_tokens": 4, "batch_size": 8},
        "torch_threads": 1,
        # lm-eval's start-up is most of a benchmark job's time: on only where a test wants it (tiny_workflow).
        "benchmarks": {"tasks": []},
    }
    config.update(overrides)
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


CUSTOM_TEMPLATE = "Q: {instruction}\nA: "
# The default local tasks, a few documents of each: 8 sentences, 1 chapter (several rolling windows of 512).
TINY_BENCHMARKS = {"limit": {"loragrid_sense": 8, "loragrid_hollow_lane": 1}}


def run_tiny_workflow(root: Path, model_dir: Path) -> tuple[Path, Path, str]:
    """The whole DAG once on the tiny model: (workflow folder, config file, snakemake's output)."""
    workdir = copy_workflow(root / "workflow")
    # A custom template: Snakemake must pass its braces to every job as written (the default
    # config's chat template runs end to end in test_real_model.py).
    config = tiny_config(workdir, model_dir, template=CUSTOM_TEMPLATE, benchmarks=TINY_BENCHMARKS)
    result = snakemake(workdir, "all", "--configfile", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir, config, result.stdout + result.stderr


def shared_dag_modules() -> set[str]:
    """The test modules that read the shared tiny DAG (the `tiny_workflow` fixture)."""
    return {path.name for path in Path(__file__).parent.glob("test_*.py") if "tiny_workflow" in path.read_text()}


def xdist_scope(nodeid: str, shared: set[str]) -> str:
    """Under `pytest -n 2` (the Makefile's) each test module runs whole on one worker, and the modules that read
    the shared tiny DAG all on the same one, one test after another as without xdist: some of them change that
    workflow for a while (a second experiment, an edited task file, dry runs with a change file)."""
    module = Path(nodeid.split("::", 1)[0]).name
    return "tiny_workflow" if module in shared else module


# Modules of few but long tests: under xdist they start first (longest first), so that neither worker is left
# alone with one at the end; the other modules follow by their number of tests, as xdist orders them.
LONG_MODULES = ("test_real_model.py", "test_compile.py", "test_seed_keys.py")


def pytest_collection_modifyitems(items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # without xdist the tests waiting on the background runs would only wait sooner
    shared = shared_dag_modules()
    scopes = [xdist_scope(item.nodeid, shared) for item in items]
    sizes = {scope: scopes.count(scope) for scope in scopes}
    first = {scope: index for index, scope in reversed(list(enumerate(scopes)))}

    def rank(scope: str) -> tuple:
        long = LONG_MODULES.index(scope) if scope in LONG_MODULES else len(LONG_MODULES)
        return long, -sizes[scope], first[scope]

    order = sorted(range(len(items)), key=lambda index: (rank(scopes[index]), index))
    items[:] = [items[index] for index in order]


@pytest.hookimpl(optionalhook=True)  # pytest -p no:xdist runs without it
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    shared = shared_dag_modules()
    config.option.loadscopereorder = False  # keep the order pytest_collection_modifyitems gave

    class SharedDagScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid, shared)

    return SharedDagScheduling(config, log)


def session_folder(tmp_path_factory) -> Path:
    """A folder that every pytest-xdist worker of this session sees (each worker's own basetemp is inside it)."""
    basetemp = tmp_path_factory.getbasetemp()
    return basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp


def run_once(folder: Path, name: str, run, *args):
    """`run(*args)` once a session however many xdist workers ask: the first to take the lock runs it and
    records its result (paths and text), its skip or its error; the others wait on the lock and read that."""
    from filelock import FileLock

    record = folder / f"{name}.json"
    with FileLock(folder / f"{name}.lock"):
        if not record.exists():
            try:
                values = run(*args)
                saved = {"values": [{"path": str(v)} if isinstance(v, Path) else v for v in values]}
            except pytest.skip.Exception as skip:
                saved = {"skip": str(skip)}
            except BaseException as error:
                record.write_text(json.dumps({"error": f"{type(error).__name__}: {error}"}))
                raise
            record.write_text(json.dumps(saved))
    saved = json.loads(record.read_text())
    if "skip" in saved:
        pytest.skip(saved["skip"])
    if "error" in saved:
        pytest.fail(f"the {name} workflow failed (run by another worker): {saved['error']}")
    return tuple(Path(v["path"]) if isinstance(v, dict) else v for v in saved["values"])


@pytest.fixture(scope="session", autouse=True)
def background_workflows(request, tmp_path_factory, tiny_model_dir):
    """Workflow runs that later tests check, started in two threads as the session starts.

    The session's own tests leave about a third of the two cores idle (interpreter start-ups,
    Snakemake's scheduling, single-threaded checks) and the SLURM runs mostly wait on the plugin's
    status polls: run beside them, they took the session from 17 min to 15 (docs/development.md). Only
    the runs that the selected tests need are started, once however many xdist workers there are; each
    test takes its run's result (or its error).
    """
    from test_export import run_export_workflow
    from test_slurm import run_slurm, stop_cluster

    items = request.session.items
    shared = session_folder(tmp_path_factory)
    futures = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        if any(item.path.name == "test_slurm.py" for item in items):
            slurm_root = tmp_path_factory.mktemp("slurm-runs")
            futures["slurm"] = pool.submit(run_once, shared, "slurm", run_slurm, slurm_root,
                                           tiny_model_dir)
        if any("tiny_workflow" in item.fixturenames for item in items):
            futures["tiny"] = pool.submit(run_once, shared, "tiny", run_tiny_workflow,
                                          tmp_path_factory.mktemp("wf"), tiny_model_dir)
        if any(item.path.name == "test_export.py" for item in items):
            futures["export"] = pool.submit(run_once, shared, "export", run_export_workflow,
                                            tmp_path_factory.mktemp("export"))
        yield futures
        concurrent.futures.wait(futures.values())
    if "slurm" in futures and (slurm_root / "cluster").exists():  # this worker started the cluster
        stop_cluster(slurm_root / "cluster")


@pytest.fixture(scope="session")
def tiny_workflow(background_workflows):
    """The whole DAG run once on the tiny model: (workflow folder, config file, snakemake's output).

    Shared by every test module that needs finished results; tests must not change them.
    """
    return background_workflows["tiny"].result()
