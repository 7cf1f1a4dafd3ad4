import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

# The Snakefile (for config checks) and every job import the loragrid package of this
# checkout: Snakemake's script preamble hands this process's sys.path on to each `script:` job.
sys.path.insert(0, workflow.basedir)

from loragrid import launch
from loragrid.benchmarks import task_files
from loragrid.common import LoragridError
from loragrid.config import (
    PEFT_METHODS,
    canonical,
    checked_runs,
    experiment_name,
    load_config,
    local_location,
)
from loragrid.tokenized import tokenization_name, tokenization_settings

try:
    # Rebuilt from the same files and --config values, merged as loragrid merges them
    # (Snakemake deep-merges a grid into the default one; loragrid replaces it).
    merged = load_config(workflow.config_settings.configfiles, workflow.config_settings.config)
    config.clear()
    config.update(merged)
    RUNS = checked_runs(config, workdir=".")
except LoragridError as error:
    raise WorkflowError(str(error)) from None

MODEL = config["model"]["name"]
DATASET = config["dataset"]["name"]
# Each experiment (by default a model and a dataset) keeps its own results and logs: switching
# configs never retrains over, or deletes, another experiment's runs. Fetched models and
# datasets in resources/ are shared by name.
EXPERIMENT = experiment_name(config)
config["experiment"] = EXPERIMENT  # for the report's workflow description (report/workflow.rst)
RESULTS = f"results/{EXPERIMENT}"
LOGS = f"logs/{EXPERIMENT}"
MODEL_DIR = f"resources/models/{MODEL}"
DATASET_DIR = f"resources/datasets/{DATASET}"
PREPARED_DIR = f"{RESULTS}/data/{DATASET}"
PEFT_RUNS = [name for name, run in RUNS.items() if run["method"] in PEFT_METHODS]
FULL_RUNS = [name for name, run in RUNS.items() if run["method"] == "full"]
TOKENIZED_DIR = f"{RESULTS}/tokenized/{DATASET}/{MODEL}"
# One tokenized split per distinct tokenization in the grid, shared by all its runs.
TOKENIZATIONS = {tokenization_name(run): tokenization_settings(run) for run in RUNS.values()}


def verbatim(value):
    """A params value exactly as configured: Snakemake reads braces in string params as
    wildcards, and a custom template's {instruction} (or a brace in a path) is not one.
    """
    return lambda wildcards: value


TEMPLATE = verbatim(config["template"])


def one_of(names):
    """A wildcard constraint that matches exactly these names (and nothing, if empty)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


def local_source(source):
    """A local source as inputs, so that editing it re-fetches it: the file, or the folder and its files
    (hub sources: none)."""
    location = local_location(source)
    return [location, *files_in(location)] if location else []


def files_in(folder):
    """A folder's files, as inputs beside it: a folder's mtime stays when a file in it is edited in place.
    Hidden ones (a clone's .git) are left out; a file is no folder: none."""
    root = Path(folder)
    if not root.is_dir():
        return []
    files = sorted(path for path in root.rglob("*") if path.is_file())
    return [str(path) for path in files if not any(part.startswith(".") for part in path.relative_to(root).parts)]


def random_only(model, key):
    """A setting only random: sources use; None for the others, so that it re-runs nothing."""
    return model.get(key) if model["source"].startswith("random:") else None


def pypi_only(model, key):
    """A setting only pypi: sources use (the GGUF file in a wheel); None for the others."""
    return model.get(key) if model["source"].startswith("pypi:") else None


def generation_settings(settings):
    """The generate section as its jobs take it: greedy decoding ignores temperature, top_p and the seed,
    so with do_sample off they re-run nothing."""
    ignored = () if settings["do_sample"] else ("temperature", "top_p", "seed")
    return canonical({key: value for key, value in settings.items() if key not in ignored})


def tokenizer_folder(model):
    """A random: source's tokenizer folder (config key model.tokenizer); no input for the others."""
    return random_only(model, "tokenizer") or []


def tokenizer_files(model):
    """The tokenizer folder's files as inputs too (files_in)."""
    folder = random_only(model, "tokenizer")
    return files_in(folder) if folder else []


def model_for(name):
    """The weights that generate and evaluate read for the base model or a run."""
    if name == "base":
        return MODEL_DIR
    if name in FULL_RUNS:
        return f"{RESULTS}/runs/{name}/model"
    return f"{RESULTS}/runs/{name}/merged"


def training_inputs(wildcards):
    """What a training job reads: the model, the split (hashed for checkpoints and provenance),
    prepare's summary and the split as tokenized for this run's tokenization settings.
    """
    return {
        "model": MODEL_DIR,
        "train": rules.prepare.output.train,
        "prepared": rules.prepare.output.summary,
        "tokenized": f"{TOKENIZED_DIR}/{tokenization_name(RUNS[wildcards.run])}",
    }


def run_folders(wildcards):
    """A run's folders beside, not inside, its outputs (Snakemake deletes a failed job's
    outputs): checkpoints to resume from, and where report_to's library writes."""
    run = wildcards.run
    return {
        "checkpoint_root": f"{RESULTS}/checkpoints/{run}",
        "tensorboard_dir": f"{RESULTS}/tensorboard/{run}",
        "wandb_dir": f"{RESULTS}/wandb/{run}",
    }


def quantization_settings(run):
    """The bitsandbytes settings a 4-bit run trained with (merge rebuilds that model to compare)."""
    if run["method"] != "qlora4":
        return {}
    return {key: value for key, value in run.items() if key.startswith("bnb_4bit_")}


def train_mem_mb(wildcards, input):
    """Host memory a train job asks for: its method, its GPUs and the model's size decide."""
    return launch.train_mem_mb(RUNS[wildcards.run], input.model)


def train_gpus(wildcards):
    return launch.gpus_of(RUNS[wildcards.run])


wildcard_constraints:
    name=one_of(["base", *RUNS]),


# The benchmark rule (rules/benchmark.smk) and the report's benchmark files.
BENCHMARK_FILES = task_files(config["benchmarks"])


COMPARISON = "1. Comparison"  # the report's first category


def report_page(name, caption, category, view):
    """A report output `results/{exp}/report/NAME`, shown in Snakemake's HTML report under
    `category` with the caption report/CAPTION.rst and the label `view`."""
    return report(
        f"{RESULTS}/report/{name}",
        caption=f"../report/{caption}.rst",
        category=category,
        labels={"view": view},
    )


def report_inputs(wildcards):
    """What the report reads: every run's train, eval and generations, the base model's, and the
    exports and benchmarks where they are on."""
    return {
        "train": expand(f"{RESULTS}/runs/{{run}}/train.json", run=RUNS),
        "evaluations": expand(f"{RESULTS}/eval/{{run}}.json", run=RUNS),
        "generations": expand(f"{RESULTS}/generations/{{run}}.jsonl", run=RUNS),
        "base_eval": f"{RESULTS}/eval/base.json",
        "base_generations": f"{RESULTS}/generations/base.jsonl",
        "exports": expand(f"{RESULTS}/gguf/{{run}}.json", run=EXPORT_RUNS),
        "benchmarks": benchmark_outputs(),
    }


def benchmark_outputs():
    """Every model's benchmark folder, or none where config key benchmarks.tasks is empty."""
    if not config["benchmarks"]["tasks"]:
        return []
    return expand(f"{RESULTS}/lm_eval/{{name}}", name=["base", *RUNS])


def benchmark_report_outputs():
    """The report's benchmark plot and evaluation_results.json, where benchmarks are on."""
    if not config["benchmarks"]["tasks"]:
        return {}
    return {
        "benchmark_plot": report_page("benchmarks.png", "benchmarks", COMPARISON, "benchmarks against the base model"),
        "benchmark_json": report_page(
            "evaluation_results.json", "evaluation_results", COMPARISON, "benchmark scores (JSON)"
        ),
    }


def report_run_pages():
    """The report's page per run (results/{exp}/report/runs/RUN.html), one entry each in the HTML report."""
    return report(
        directory(f"{RESULTS}/report/runs"),
        patterns=["{run}.html"],
        caption="../report/run.rst",
        category="4. Runs",
        labels={"run": "{run}"},
    )


# The export's (rules/export.smk defines EXPORT, GGUF_DIR and CONVERTER_DIR).
def export_inputs(wildcards):
    """What an export job reads: the run's full or merged model, the converter, the held-out
    questions and the run's own answers (the transformers side of the check)."""
    return {
        "model": model_for(wildcards.run),
        "converter": CONVERTER_DIR,
        "heldout": rules.prepare.output.heldout,
        "generations": f"{RESULTS}/generations/{wildcards.run}.jsonl",
    }


def exported(suffix):
    """One file per export type (config key export.types) of a run: {run}-{type}{suffix}."""
    return expand(f"{GGUF_DIR}/{{run}}-{{t}}{suffix}", t=EXPORT["types"], allow_missing=True)
