from loragrid.common import logging_to
from loragrid.fetch import fetch_dataset

# offline decides how the files are fetched, never what they are: read from the config, not a param.
with logging_to(snakemake.log[0]):
    fetch_dataset(snakemake.params.source, snakemake.output[0], offline=snakemake.config["offline"])
