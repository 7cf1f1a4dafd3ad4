from pathlib import Path

from loragrid.common import logging_to
from loragrid.tokenized import tokenize_to_disk

with logging_to(snakemake.log[0]):
    tokenize_to_disk(
        snakemake.input.model,
        Path(snakemake.input.train).parent,
        snakemake.output[0],
        snakemake.params.settings,
        snakemake.params.template,
        trust_remote_code=snakemake.params.trust_remote_code,
    )
