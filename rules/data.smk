rule prepare:
    input:
        DATASET_DIR,
    output:
        train=f"{PREPARED_DIR}/train.jsonl",
        heldout=f"{PREPARED_DIR}/heldout.jsonl",
        summary=f"{PREPARED_DIR}/prepare.json",
    log:
        f"logs/prepare/{DATASET}.log",
    conda:
        "../envs/data.yaml"
    params:
        dataset=canonical(config["dataset"]),
        split=canonical(config["split"]),
    script:
        "../scripts/prepare.py"
