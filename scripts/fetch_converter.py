from loragrid.common import logging_to
from loragrid.export import fetch_converter

with logging_to(snakemake.log[0]):
    fetch_converter(snakemake.output[0], snakemake.params.version)
