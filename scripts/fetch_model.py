from loragrid.common import logging_to
from loragrid.fetch import fetch_model

with logging_to(snakemake.log[0]):
    fetch_model(
        snakemake.params.source,
        snakemake.output[0],
        gguf_file=snakemake.params.gguf_file,
        trust_remote_code=snakemake.params.trust_remote_code,
    )
