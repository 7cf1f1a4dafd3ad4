from loragrid.common import logging_to
from loragrid.fetch import fetch_model

# allow_pickle and offline decide whether and how the files are fetched, never what they are,
# so they are read from the config rather than passed as params (a change re-runs nothing).
with logging_to(snakemake.log[0]):
    fetch_model(
        snakemake.params.source,
        snakemake.output[0],
        gguf_file=snakemake.params.gguf_file,
        trust_remote_code=snakemake.params.trust_remote_code,
        tokenizer=snakemake.input.get("tokenizer") or None,  # random: sources only
        seed=snakemake.params.seed,
        allow_pickle=snakemake.config["model"]["allow_pickle"],
        offline=snakemake.config["offline"],
    )
