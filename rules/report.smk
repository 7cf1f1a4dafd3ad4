rule report:
    input:
        train=expand("results/runs/{run}/train.json", run=RUNS),
        evaluations=expand("results/eval/{run}.json", run=RUNS),
        generations=expand("results/generations/{run}.jsonl", run=RUNS),
        base_eval="results/eval/base.json",
        base_generations="results/generations/base.jsonl",
    output:
        table=report(
            "results/report/summary.csv",
            caption="../report/summary_csv.rst",
            category="1. Comparison",
            labels={"view": "table (CSV download)"},
        ),
        table_html=report(
            "results/report/summary.html",
            caption="../report/summary.rst",
            category="1. Comparison",
            labels={"view": "table"},
        ),
        memory_plot=report(
            "results/report/memory.png",
            caption="../report/memory.rst",
            category="1. Comparison",
            labels={"view": "memory per run"},
        ),
        quality_plot=report(
            "results/report/quality_vs_memory.png",
            caption="../report/quality_vs_memory.rst",
            category="1. Comparison",
            labels={"view": "quality against memory"},
        ),
        markdown=report(
            "results/report/report.md",
            caption="../report/report_md.rst",
            category="1. Comparison",
            labels={"view": "report.md"},
        ),
        loss_plot=report(
            "results/report/loss_curves.png",
            caption="../report/loss_curves.rst",
            category="2. Training",
            labels={"view": "loss curves"},
        ),
        samples=report(
            "results/report/samples.html",
            caption="../report/samples.rst",
            category="3. Answers",
            labels={"view": "base vs every run"},
        ),
        runs=report(
            directory("results/report/runs"),
            patterns=["{run}.html"],
            caption="../report/run.rst",
            category="4. Runs",
            labels={"run": "{run}"},
        ),
    log:
        "logs/report/report.log",
    conda:
        "../envs/report.yaml"
    params:
        runs=list(RUNS),
        sample_count=config["report"]["samples"],
    script:
        "../scripts/report.py"
