from pathlib import Path

from loragrid.common import logging_to
from loragrid.data import prepare

dataset, split = snakemake.params.dataset, snakemake.params.split
with logging_to(snakemake.log[0]):
    prepare(
        Path(snakemake.input[0]) / "records.jsonl",
        Path(snakemake.output.train).parent,
        data_format=dataset["format"],
        question_field=dataset["question_field"],
        answer_fields=dataset["answer_fields"],
        heldout_fraction=split["heldout_fraction"],
        heldout_min=split["heldout_min"],
        seed=split["seed"],
        on_bad_record=dataset["on_bad_record"],
    )
