rule prepare:
    input:
        DATASET_DIR,
    output:
        train=f"{PREPARED_DIR}/train.jsonl",
        heldout=f"{PREPARED_DIR}/heldout.jsonl",
        summary=f"{PREPARED_DIR}/prepare.json",
    log:
        f"{LOGS}/prepare/{DATASET}.log",
    conda:
        "../envs/data.yaml"
    params:
        dataset=canonical(config["dataset"]),
        split=canonical(config["split"]),
    script:
        "../scripts/prepare.py"


rule tokenize_split:
    input:
        model=MODEL_DIR,
        train=rules.prepare.output.train,
        prepared=rules.prepare.output.summary,
    output:
        directory(f"{TOKENIZED_DIR}/{{tokenization}}"),
    log:
        f"{LOGS}/tokenize/{DATASET}/{MODEL}/{{tokenization}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tokenize/{DATASET}/{MODEL}/{{tokenization}}.tsv"
    wildcard_constraints:
        tokenization=one_of(TOKENIZATIONS),
    conda:
        "../envs/train.yaml"
    params:
        settings=lambda wildcards: TOKENIZATIONS[wildcards.tokenization],
        template=TEMPLATE,
        trust_remote_code=config["model"]["trust_remote_code"],
    script:
        "../scripts/tokenize_split.py"
