from loragrid.common import logging_to
from loragrid.fetch import fetch_dataset

with logging_to(snakemake.log[0]):
    fetch_dataset(snakemake.params.source, snakemake.output[0])
