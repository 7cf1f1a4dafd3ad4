# lm-evaluation-harness on the base model and every run; config key `benchmarks` (tasks: [] turns it off).
# The task files and the data they read are inputs: editing one re-runs the benchmarks.
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
    script:
        "../scripts/benchmark.py"
