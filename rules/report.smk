rule report:
    input:
        train=expand(f"{RESULTS}/runs/{{run}}/train.json", run=RUNS),
        evaluations=expand(f"{RESULTS}/eval/{{run}}.json", run=RUNS),
        generations=expand(f"{RESULTS}/generations/{{run}}.jsonl", run=RUNS),
        base_eval=f"{RESULTS}/eval/base.json",
        base_generations=f"{RESULTS}/generations/base.jsonl",
        exports=expand(f"{GGUF_DIR}/{{run}}.json", run=EXPORT_RUNS),
        benchmarks=benchmark_outputs(),
    output:
        **benchmark_report_outputs(),
        table=report(
            f"{RESULTS}/report/summary.csv",
            caption="../report/summary_csv.rst",
            category="1. Comparison",
            labels={"view": "table (CSV download)"},
        ),
        table_html=report(
            f"{RESULTS}/report/summary.html",
            caption="../report/summary.rst",
            category="1. Comparison",
            labels={"view": "table"},
        ),
        memory_plot=report(
            f"{RESULTS}/report/memory.png",
            caption="../report/memory.rst",
            category="1. Comparison",
            labels={"view": "memory per run"},
        ),
        quality_plot=report(
            f"{RESULTS}/report/quality_vs_memory.png",
            caption="../report/quality_vs_memory.rst",
            category="1. Comparison",
            labels={"view": "quality against memory"},
        ),
        markdown=report(
            f"{RESULTS}/report/report.md",
            caption="../report/report_md.rst",
            category="1. Comparison",
            labels={"view": "report.md"},
        ),
        loss_plot=report(
            f"{RESULTS}/report/loss_curves.png",
            caption="../report/loss_curves.rst",
            category="2. Training",
            labels={"view": "loss curves"},
        ),
        samples=report(
            f"{RESULTS}/report/samples.html",
            caption="../report/samples.rst",
            category="3. Answers",
            labels={"view": "base vs every run"},
        ),
        runs=report(
            directory(f"{RESULTS}/report/runs"),
            patterns=["{run}.html"],
            caption="../report/run.rst",
            category="4. Runs",
            labels={"run": "{run}"},
        ),
    log:
        f"{LOGS}/report/report.log",
    conda:
        "../envs/report.yaml"
    params:
        runs=list(RUNS),
        sample_count=config["report"]["samples"],
    script:
        "../scripts/report.py"
