rule train_adapter:
    input:
        model=MODEL_DIR,
        train=rules.prepare.output.train,
        prepared=rules.prepare.output.summary,
        tokenized=tokenized_split_of,
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
        torch_threads=config["torch_threads"],
        # Beside, not inside, the outputs: Snakemake deletes a failed job's outputs.
        checkpoints=lambda wildcards: f"{RESULTS}/checkpoints/{wildcards.run}",
        tensorboard=lambda wildcards: f"{RESULTS}/tensorboard/{wildcards.run}",
        wandb=lambda wildcards: f"{RESULTS}/wandb/{wildcards.run}",
    script:
        "../scripts/train.py"


use rule train_adapter as train_full with:
    output:
        weights=directory(f"{RESULTS}/runs/{{run}}/model"),
        summary=f"{RESULTS}/runs/{{run}}/train.json",
    wildcard_constraints:
        run=one_of(FULL_RUNS),
