rule report:
    input:
        train=expand("results/runs/{run}/train.json", run=RUNS),
        evaluations=expand("results/eval/{run}.json", run=RUNS),
        base="results/eval/base.json",
    output:
        table=report(
            "results/report/summary.csv",
            category="Comparison",
            caption="../report/summary.rst",
        ),
        markdown=report(
            "results/report/report.md",
            category="Comparison",
            caption="../report/report_md.rst",
        ),
        loss_plot=report(
            "results/report/loss_curves.png",
            category="Training",
            caption="../report/loss_curves.rst",
        ),
        memory_plot=report(
            "results/report/memory_quality.png",
            category="Comparison",
            caption="../report/memory_quality.rst",
        ),
    params:
        runs=list(RUNS),
    log:
        "logs/report/report.log",
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/report.py"
