from loragrid.common import logging_to, use_threads
from loragrid.evaluate import evaluate_to_file

with logging_to(snakemake.log[0]):
    use_threads(snakemake.config["torch_threads"])
    evaluate_to_file(
        snakemake.output[0],
        model_dir=snakemake.input.model,
        heldout_path=snakemake.input.heldout,
        generations_path=snakemake.input.answers,
        generation_meta_path=snakemake.input.meta,
        template=snakemake.params.template,
        batch_size=snakemake.params.settings["batch_size"],
        trust_remote_code=snakemake.params.trust_remote_code,
    )
