from pathlib import Path

from loragrid.common import logging_to, use_threads
from loragrid.train import train_to_files

with logging_to(snakemake.log[0]):
    use_threads(snakemake.params.torch_threads)
    train_to_files(
        snakemake.input.model,
        Path(snakemake.input.train).parent,
        snakemake.output.weights,
        snakemake.output.summary,
        snakemake.params.settings,
        snakemake.params.template,
        trust_remote_code=snakemake.params.trust_remote_code,
        checkpoint_root=snakemake.params.checkpoints,
        tensorboard_dir=snakemake.params.tensorboard,
    )
