rule merge:
    input:
        model=MODEL_DIR,
        adapter="results/runs/{run}/adapter",
        heldout=rules.prepare.output.heldout,
    output:
        merged=directory("results/runs/{run}/merged"),
        summary="results/runs/{run}/merge.json",
    wildcard_constraints:
        run=one_of(PEFT_RUNS),
    params:
        method=lambda wildcards: RUNS[wildcards.run]["method"],
        template=config["template"],
        check=canonical(config["merge"]),
        trust_remote_code=config["model"]["trust_remote_code"],
        torch_threads=config["torch_threads"],
    log:
        "logs/merge/{run}.log",
    benchmark:
        "results/benchmarks/merge/{run}.tsv"
    conda:
        "../envs/merge.yaml"
    script:
        "../scripts/merge.py"
