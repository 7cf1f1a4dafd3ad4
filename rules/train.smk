rule train_adapter:
    input:
        unpack(training_inputs),
    output:
        weights=directory(f"{RESULTS}/runs/{{run}}/adapter"),
        summary=f"{RESULTS}/runs/{{run}}/train.json",
    log:
        f"{LOGS}/train/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{run}}.tsv"
    wildcard_constraints:
        run=one_of(PEFT_RUNS),
    conda:
        "../envs/train.yaml"
    resources:
        mem_mb=train_mem_mb,
        gpu=train_gpus,
    params:
        settings=lambda wildcards: RUNS[wildcards.run],
        template=TEMPLATE,
        trust_remote_code=config["model"]["trust_remote_code"],
        folders=run_folders,
    script:
        "../scripts/train.py"


use rule train_adapter as train_full with:
    output:
        weights=directory(f"{RESULTS}/runs/{{run}}/model"),
        summary=f"{RESULTS}/runs/{{run}}/train.json",
    wildcard_constraints:
        run=one_of(FULL_RUNS),
