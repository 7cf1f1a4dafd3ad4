rule merge:
    input:
        model=MODEL_DIR,
        adapter=f"{RESULTS}/runs/{{run}}/adapter",
        heldout=rules.prepare.output.heldout,
    output:
        merged=directory(f"{RESULTS}/runs/{{run}}/merged"),
        summary=f"{RESULTS}/runs/{{run}}/merge.json",
    log:
        f"{LOGS}/merge/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/merge/{{run}}.tsv"
    wildcard_constraints:
        run=one_of(PEFT_RUNS),
    conda:
        "../envs/merge.yaml"
    params:
        method=lambda wildcards: RUNS[wildcards.run]["method"],
        quantization=lambda wildcards: quantization_settings(RUNS[wildcards.run]),
        template=TEMPLATE,
        check=canonical(config["merge"]),
        trust_remote_code=config["model"]["trust_remote_code"],
    script:
        "../scripts/merge.py"
