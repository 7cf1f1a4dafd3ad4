# lm-evaluation-harness on the base model and every run; config key `benchmarks` (tasks: [] turns it off).
# The task files and the data they read are inputs: editing one re-runs the benchmarks.
from loragrid.benchmarks import task_files

BENCHMARK_FILES = task_files(config["benchmarks"])


def benchmark_outputs(wildcards=None):
    """Every model's benchmark folder, or none where config key benchmarks.tasks is empty."""
    if not config["benchmarks"]["tasks"]:
        return []
    return expand(f"{RESULTS}/lm_eval/{{name}}", name=["base", *RUNS])


rule benchmark:
    input:
        model=lambda wildcards: model_for(wildcards.name),
        tasks=BENCHMARK_FILES,
    output:
        directory(f"{RESULTS}/lm_eval/{{name}}"),
    log:
        f"{LOGS}/benchmark/{{name}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/benchmark/{{name}}.tsv"
    conda:
        "../envs/benchmark.yaml"
    params:
        settings=canonical(config["benchmarks"]),
        trust_remote_code=config["model"]["trust_remote_code"],
        torch_threads=config["torch_threads"],
    script:
        "../scripts/benchmark.py"


def benchmark_report_outputs():
    """The report's benchmark plot and evaluation_results.json, where benchmarks are on."""
    if not config["benchmarks"]["tasks"]:
        return {}
    return {
        "benchmark_plot": report(
            f"{RESULTS}/report/benchmarks.png",
            caption="../report/benchmarks.rst",
            category="1. Comparison",
            labels={"view": "benchmarks against the base model"},
        ),
        "benchmark_json": f"{RESULTS}/report/evaluation_results.json",
    }
