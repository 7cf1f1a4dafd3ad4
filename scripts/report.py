from loragrid.common import logging_to
from loragrid.report import write_report

inputs, outputs = snakemake.input, snakemake.output
with logging_to(snakemake.log[0]):
    write_report(
        {
            name: {"train": train, "eval": evaluation, "generations": answers}
            for name, train, evaluation, answers in zip(
                snakemake.params.runs,
                inputs.train,
                inputs.evaluations,
                inputs.generations,
            )
        },
        {"eval": inputs.base_eval, "generations": inputs.base_generations},
        table_csv=outputs.table,
        table_html=outputs.table_html,
        markdown=outputs.markdown,
        loss_plot=outputs.loss_plot,
        memory_plot=outputs.memory_plot,
        quality_plot=outputs.quality_plot,
        samples_page=outputs.samples,
        runs_dir=outputs.runs,
        sample_count=snakemake.params.sample_count,
        exports=inputs.exports,
        benchmarks=dict(zip(["base", *snakemake.params.runs], inputs.benchmarks)),
        benchmark_plot=getattr(outputs, "benchmark_plot", None),
        benchmark_json=getattr(outputs, "benchmark_json", None),
    )
