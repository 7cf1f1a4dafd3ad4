rule evaluate:
    input:
        model=lambda wildcards: model_for(wildcards.name),
        heldout=rules.prepare.output.heldout,
        prepared=rules.prepare.output.summary,
        answers=rules.generate.output.answers,
        meta=rules.generate.output.meta,
    output:
        f"{RESULTS}/eval/{{name}}.json",
    log:
        f"{LOGS}/evaluate/{{name}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{name}}.tsv"
    conda:
        "../envs/evaluate.yaml"
    params:
        settings=canonical(config["evaluate"]),
        template=TEMPLATE,
        trust_remote_code=config["model"]["trust_remote_code"],
    script:
        "../scripts/evaluate.py"
