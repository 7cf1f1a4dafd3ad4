"""prepare: validate JSONL records, normalise them to conversations, split off held-out questions."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from .common import LoragridError, atomic_dir, sha256_file, write_json, write_jsonl

log = logging.getLogger("loragrid.data")


def _question_key(text: str) -> str:
    # Case and spacing differences do not make a new question: such near-copies
    # must land in the same split, or held-out scores would flatter the model.
    return " ".join(text.casefold().split())


def read_qa_records(path: str | Path, question_field: str, answer_fields: list[str]):
    """Yield (line_number, record or None, reason) for every non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                yield line_number, None, f"invalid JSON ({error.msg} at column {error.colno})"
                continue
            if not isinstance(raw, dict):
                yield line_number, None, f"expected a JSON object, got {type(raw).__name__}"
                continue
            question = raw.get(question_field)
            if not isinstance(question, str) or not question.strip():
                yield line_number, None, f"missing or empty field '{question_field}'"
                continue
            answer = next((raw[f] for f in answer_fields if isinstance(raw.get(f), str) and raw[f].strip()), None)
            if answer is None:
                yield line_number, None, f"none of the answer fields {answer_fields} holds text"
                continue
            yield line_number, {
                "id": f"line{line_number}",
                "messages": [
                    {"role": "user", "content": question.strip()},
                    {"role": "assistant", "content": answer.strip()},
                ],
            }, None


def prepare(records_path: str | Path, out_dir: str | Path, *, question_field: str = "question",
            answer_fields: list[str] = ("answer_en", "answer_zh"), heldout_fraction: float = 0.1,
            heldout_min: int = 30, seed: int = 42, on_bad_record: str = "fail",
            display_name: str | None = None) -> dict:
    """Write train.jsonl, heldout.jsonl and prepare.json into `out_dir`.

    `display_name` is the file name used in messages (the user's file, not our copy of it).
    """
    display_name = display_name or str(records_path)
    records, rejected = [], []
    for line_number, record, reason in read_qa_records(records_path, question_field, list(answer_fields)):
        if record is None:
            if on_bad_record == "fail":
                raise LoragridError(
                    f"{display_name}, line {line_number}: {reason} "
                    "(set dataset.on_bad_record: skip to count and skip such records)"
                )
            rejected.append({"file": display_name, "line": line_number, "reason": reason})
            continue
        records.append(record)

    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(_question_key(record["messages"][0]["content"]), []).append(record)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_heldout = max(heldout_min, round(heldout_fraction * len(keys)))
    if n_heldout >= len(keys):
        raise LoragridError(
            f"{display_name}: {len(keys)} distinct questions are too few for {n_heldout} held-out questions "
            "(config keys 'split.heldout_min' and 'split.heldout_fraction')"
        )
    heldout_keys = set(keys[:n_heldout])
    # One record per held-out question: a repeated question would count twice in every score.
    heldout = [groups[key][0] for key in keys[:n_heldout]]
    train = [record for key in keys[n_heldout:] for record in groups[key]]

    summary = {
        "source": display_name,
        "records_read": len(records) + len(rejected),
        "records_valid": len(records),
        "distinct_questions": len(keys),
        "train": len(train),
        "heldout": len(heldout),
        "heldout_repeats_dropped": sum(len(groups[key]) - 1 for key in heldout_keys),
        "rejected_count": len(rejected),
        "rejected": rejected,
        "settings": {"question_field": question_field, "answer_fields": list(answer_fields),
                     "heldout_fraction": heldout_fraction, "heldout_min": heldout_min, "seed": seed,
                     "on_bad_record": on_bad_record},
        "input_sha256": sha256_file(records_path),
    }
    assert not heldout_keys & {_question_key(r["messages"][0]["content"]) for r in train}
    with atomic_dir(out_dir) as staging:
        write_jsonl(staging / "train.jsonl", train)
        write_jsonl(staging / "heldout.jsonl", heldout)
        summary["output_sha256"] = {name: sha256_file(staging / name) for name in ("train.jsonl", "heldout.jsonl")}
        write_json(staging / "prepare.json", summary)
    log.info("prepared %d train and %d held-out records (%d rejected)", len(train), len(heldout), len(rejected))
    return summary
