rule report:
    input:
        unpack(report_inputs),
    output:
        **benchmark_report_outputs(),
        table=report_page("summary.csv", "summary_csv", COMPARISON, "table (CSV download)"),
        table_html=report_page("summary.html", "summary", COMPARISON, "table"),
        memory_plot=report_page("memory.png", "memory", COMPARISON, "memory per run"),
        quality_plot=report_page("quality_vs_memory.png", "quality_vs_memory", COMPARISON, "quality against memory"),
        markdown=report_page("report.md", "report_md", COMPARISON, "report.md"),
        loss_plot=report_page("loss_curves.png", "loss_curves", "2. Training", "loss curves"),
        samples=report_page("samples.html", "samples", "3. Answers", "base vs every run"),
        runs=report_run_pages(),
    log:
        f"{LOGS}/report/report.log",
    conda:
        "../envs/report.yaml"
    params:
        runs=list(RUNS),
        sample_count=config["report"]["samples"],
    script:
        "../scripts/report.py"
