def local_source(source):
    """A local source as an input, so that editing the file re-fetches it (hub sources: none)."""
    scheme, _, location = source.partition(":")
    return [location] if scheme in ("local", "gguf", "torch") else []


rule fetch_model:
    input:
        local_source(config["model"]["source"]),
    output:
        directory(MODEL_DIR),
    params:
        source=config["model"]["source"],
        gguf_file=config["model"].get("gguf_file"),
        trust_remote_code=config["model"]["trust_remote_code"],
    log:
        f"logs/fetch_model/{MODEL}.log",
    benchmark:
        f"results/benchmarks/fetch_model/{MODEL}.tsv"
    conda:
        "../envs/fetch.yaml"
    script:
        "../scripts/fetch_model.py"


rule fetch_dataset:
    input:
        local_source(config["dataset"]["source"]),
    output:
        directory(DATASET_DIR),
    params:
        source=config["dataset"]["source"],
    log:
        f"logs/fetch_dataset/{DATASET}.log",
    conda:
        "../envs/fetch.yaml"
    script:
        "../scripts/fetch_dataset.py"
