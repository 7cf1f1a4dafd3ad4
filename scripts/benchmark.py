from loragrid.benchmarks import run_benchmarks
from loragrid.common import logging_to, use_threads

with logging_to(snakemake.log[0]):
    use_threads(snakemake.config["torch_threads"])
    run_benchmarks(
        snakemake.input.model,
        snakemake.output[0],
        snakemake.params.settings,
        trust_remote_code=snakemake.params.trust_remote_code,
    )
