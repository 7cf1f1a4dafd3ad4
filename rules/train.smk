rule train_adapter:
    input:
        model=MODEL_DIR,
        train=rules.prepare.output.train,
        prepared=rules.prepare.output.summary,
        tokenized=tokenized_split_of,
    output:
        weights=directory("results/runs/{run}/adapter"),
        summary="results/runs/{run}/train.json",
    log:
        "logs/train/{run}.log",
    benchmark:
        "results/benchmarks/train/{run}.tsv"
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
        checkpoints=lambda wildcards: f"results/checkpoints/{wildcards.run}",
        tensorboard=lambda wildcards: f"results/tensorboard/{wildcards.run}",
    script:
        "../scripts/train.py"


use rule train_adapter as train_full with:
    output:
        weights=directory("results/runs/{run}/model"),
        summary="results/runs/{run}/train.json",
    wildcard_constraints:
        run=one_of(FULL_RUNS),
