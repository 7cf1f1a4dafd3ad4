from loragrid.common import logging_to, use_threads
from loragrid.merge import merge_to_files

with logging_to(snakemake.log[0]):
    use_threads(snakemake.config["torch_threads"])
    merge_to_files(
        snakemake.input.model,
        snakemake.input.adapter,
        snakemake.output.merged,
        snakemake.output.summary,
        heldout_path=snakemake.input.heldout,
        template=snakemake.params.template,
        method=snakemake.params.method,
        check_prompts=snakemake.params.check["check_prompts"],
        tolerance=snakemake.params.check["tolerance"],
        trust_remote_code=snakemake.params.trust_remote_code,
        quantization=snakemake.params.quantization,
    )
