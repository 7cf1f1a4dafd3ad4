from loragrid.common import logging_to
from loragrid.report import write_report

runs = snakemake.params.runs
with logging_to(snakemake.log[0]):
    write_report(
        {
            name: {"train": train, "eval": evaluation}
            for name, train, evaluation in zip(
                runs, snakemake.input.train, snakemake.input.evaluations
            )
        },
        snakemake.input.base,
        snakemake.output.table,
        snakemake.output.markdown,
        snakemake.output.loss_plot,
        snakemake.output.memory_plot,
    )
