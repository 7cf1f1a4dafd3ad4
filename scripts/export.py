from loragrid.common import logging_to, use_threads
from loragrid.export import export_run, export_settings

with logging_to(snakemake.log[0]):
    threads = use_threads(snakemake.config["torch_threads"])
    export_run(
        snakemake.input.model,
        snakemake.input.converter,
        snakemake.input.heldout,
        snakemake.input.generations,
        snakemake.output.summary,
        run=snakemake.wildcards.run,
        template=snakemake.params.template,
        settings=export_settings(snakemake.params.export, snakemake.params.generate, threads),
        trust_remote_code=snakemake.params.trust_remote_code,
    )
