rule generate:
    input:
        model=lambda wildcards: model_for(wildcards.name),
        heldout=rules.prepare.output.heldout,
    output:
        answers=f"{RESULTS}/generations/{{name}}.jsonl",
        meta=f"{RESULTS}/generations/{{name}}.json",
    log:
        f"{LOGS}/generate/{{name}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/generate/{{name}}.tsv"
    conda:
        "../envs/generate.yaml"
    params:
        settings=generation_settings(config["generate"]),
        template=TEMPLATE,
        trust_remote_code=config["model"]["trust_remote_code"],
    script:
        "../scripts/generate.py"
