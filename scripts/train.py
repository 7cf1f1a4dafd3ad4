from pathlib import Path

from loragrid.common import logging_to, use_threads
from loragrid.config import keys_as_written
from loragrid.train import train_run

with logging_to(snakemake.log[0]), keys_as_written(snakemake.config, snakemake.wildcards.run):
    use_threads(snakemake.config["torch_threads"])
    train_run(
        snakemake.params.settings,
        model_dir=snakemake.input.model,
        data_dir=Path(snakemake.input.train).parent,
        weights_dir=snakemake.output.weights,
        train_json=snakemake.output.summary,
        template=snakemake.params.template,
        trust_remote_code=snakemake.params.trust_remote_code,
        **snakemake.params.folders,
        # Read here, not a param: moving the shared cache must not re-train anything.
        compile_cache_dir=snakemake.config["compile_cache"],
        run_name=snakemake.wildcards.run,
        tokenized_dir=snakemake.input.tokenized,
    )
