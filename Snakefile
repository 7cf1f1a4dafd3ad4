from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/fetch.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/merge.smk"
include: "rules/generate.smk"
include: "rules/evaluate.smk"
include: "rules/export.smk"
include: "rules/benchmark.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        rules.report.output,


onsuccess:
    from loragrid.report import write_index

    write_index(
        "results",
        EXPERIMENT,
        {
            "model": config["model"]["source"],
            "dataset": config["dataset"]["source"],
            "runs": list(RUNS),
        },
    )
