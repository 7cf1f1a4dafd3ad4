from loragrid.common import logging_to, use_threads
from loragrid.generate import generate

with logging_to(snakemake.log[0]):
    use_threads(snakemake.config["torch_threads"])
    generate(
        snakemake.input.model,
        snakemake.input.heldout,
        snakemake.output.answers,
        snakemake.output.meta,
        snakemake.params.template,
        snakemake.params.settings,
        trust_remote_code=snakemake.params.trust_remote_code,
    )
