"""Dataset files in, conversations out.

`gather_records` (used by fetch_dataset) reads .jsonl, .json (a list), .csv and .parquet files,
or a folder of them, into one records.jsonl and remembers which file and line each record came
from. `prepare` checks every record against its format (qa, alpaca, messages), turns it into a
conversation and splits off held-out questions.

JSONL files are copied line for line rather than read by `datasets`: a malformed line must be
reported (or skipped) on its own, with its line number, instead of failing the whole file.
The other formats are read by `datasets`, which either parses a file or rejects it whole.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from .common import LoragridError, atomic_dir, read_json, sha256_file, write_json, write_jsonl

log = logging.getLogger("loragrid.data")

# suffix -> (datasets builder, how a record is located in the user's file, number of the first record)
FILE_FORMATS = {
    ".jsonl": ("json", "line", 1),
    ".json": ("json", "record", 1),
    ".csv": ("csv", "line", 2),  # line 1 is the header
    ".parquet": ("parquet", "row", 1),
}
FORMATS = ("qa", "alpaca", "messages")
# sharegpt's `from` values and OpenAI's roles, as one vocabulary.
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


class BadRecord(Exception):
    """One record that does not fit its format; the message says what was expected."""


# --- reading files -------------------------------------------------------------------------------

def data_files(path: Path, display: str) -> list[tuple[Path, str]]:
    """The data files at `path` (one file or a folder, searched recursively) with their display names."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_FORMATS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise LoragridError(f"{display}: the folder holds no data files ({', '.join(FILE_FORMATS)})")
        return [(file, f"{display.rstrip('/')}/{file.relative_to(path)}") for file in files]
    if not path.is_file():
        raise LoragridError(f"{display}: no such file or folder")
    if path.suffix not in FILE_FORMATS:
        raise LoragridError(f"{display}: unsupported file type '{path.suffix}' (expected {', '.join(FILE_FORMATS)})")
    return [(path, display)]


def _utf8_text(file: Path, display: str) -> str:
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise LoragridError(f"{display}, line {line}: not valid UTF-8 (byte 0x{raw[error.start]:02x}); "
                            "save the file as UTF-8") from None


def _rows_with_datasets(file: Path, display: str, builder: str, scratch: Path) -> list[dict]:
    from datasets import load_dataset

    if builder != "parquet":
        text = _utf8_text(file, display)
        if builder == "csv" and len([line for line in text.splitlines() if line.strip()]) < 2:
            return []  # a header alone: datasets would report "no data" instead of an empty file
        if builder == "json":
            # Parsed here as well because datasets' error for a broken file names no line.
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as error:
                raise LoragridError(f"{display}, line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(parsed, list):
                raise LoragridError(f"{display}: expected a JSON list of records, got a {type(parsed).__name__} "
                                    "(one record per line belongs in a .jsonl file)")
    try:
        dataset = load_dataset(builder, data_files=str(file), split="train", cache_dir=str(scratch))
    except Exception as error:  # datasets raises many types for a file it cannot parse
        raise LoragridError(f"{display}: datasets cannot read it as {file.suffix[1:]}: {error}") from error
    return dataset.to_list()


def gather_records(path: Path, display: str, target: Path, scratch: Path) -> list[dict]:
    """Write every record under `path` to `target` (JSON lines) and return where each file's records went.

    Each entry of the returned list ("parts") maps lines of `target` back to the user's file:
    {file, start (first line in target), count, unit (line/record/row), first (its number in the file)}.
    """
    parts, written = [], 0
    with open(target, "wb") as out:
        for file, name in data_files(path, display):
            builder, unit, first = FILE_FORMATS[file.suffix]
            if file.suffix == ".jsonl":
                data = file.read_bytes()
                lines = data.split(b"\n")
                if lines and lines[-1] == b"":
                    lines.pop()
                # Kept byte for byte (bad lines included): prepare judges each line and names it.
                out.writelines(line.rstrip(b"\r") + b"\n" for line in lines)
                count = len(lines)
                empty = not data.strip()
            else:
                rows = _rows_with_datasets(file, name, builder, scratch)
                out.writelines((json.dumps(row, ensure_ascii=False, default=str) + "\n").encode() for row in rows)
                count, empty = len(rows), not rows
            if empty:
                raise LoragridError(f"{name}: the file is empty (expected records of a dataset)")
            parts.append({"file": name, "start": written + 1, "count": count, "unit": unit, "first": first})
            written += count
    return parts


def locate(parts: list[dict], line: int) -> tuple[str, str, int]:
    """(file, unit, number) of line `line` of records.jsonl in the user's terms."""
    for part in parts:
        if part["start"] <= line < part["start"] + part["count"]:
            return part["file"], part["unit"], part["first"] + line - part["start"]
    raise ValueError(f"line {line} is outside every part")


# --- records to conversations --------------------------------------------------------------------

def _text(raw: dict, field: str, what: str | None = None) -> str:
    value = raw.get(field)
    if value is None:
        raise BadRecord(f"missing field '{field}'" + (f" ({what})" if what else ""))
    if not isinstance(value, str):
        raise BadRecord(f"field '{field}' should be text, got {type(value).__name__}")
    if not value.strip():
        raise BadRecord(f"field '{field}' is empty")
    return value.strip()


def _system(raw: dict) -> list[dict]:
    value = raw.get("system")
    return [{"role": "system", "content": value.strip()}] if isinstance(value, str) and value.strip() else []


def _qa(raw: dict, question_field: str, answer_fields: list[str]) -> list[dict]:
    question = _text(raw, question_field, "the question")
    # A column that a CSV or Parquet file has but leaves empty arrives as None: present, but empty.
    present = [field for field in answer_fields if field in raw]
    if not present:
        raise BadRecord(f"none of the answer fields {answer_fields} is present")
    answer = next((raw[f] for f in present if isinstance(raw[f], str) and raw[f].strip()), None)
    wrong_type = next((f for f in present if raw[f] is not None and not isinstance(raw[f], str)), None)
    if answer is None and wrong_type:
        raise BadRecord(f"answer field '{wrong_type}' should be text, got {type(raw[wrong_type]).__name__}")
    if answer is None:
        raise BadRecord(f"answer field '{present[0]}' is empty (an empty answer teaches the model to say nothing)")
    return [*_system(raw), {"role": "user", "content": question}, {"role": "assistant", "content": answer.strip()}]


def _alpaca(raw: dict) -> list[dict]:
    user = {"role": "user", "content": _text(raw, "instruction")}
    context = raw.get("input")
    if context is not None and not isinstance(context, str):
        raise BadRecord(f"field 'input' should be text, got {type(context).__name__}")
    if context and context.strip():  # an empty input is the common case: the instruction says it all
        user["input"] = context.strip()
    return [*_system(raw), user, {"role": "assistant", "content": _text(raw, "output", "the answer")}]


def _messages(raw: dict) -> list[dict]:
    field = next((f for f in ("messages", "conversations") if f in raw), None)
    if field is None:
        raise BadRecord("missing field 'messages' (OpenAI role/content) or 'conversations' (sharegpt from/value)")
    turns = raw[field]
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"field '{field}' should be a non-empty list of turns")
    messages = _system(raw)
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise BadRecord(f"{field}[{number}] should be an object, got {type(turn).__name__}")
        role_key, content_key = ("role", "content") if "role" in turn else ("from", "value")
        role = ROLES.get(str(turn.get(role_key)).lower())
        if role is None:
            raise BadRecord(f"{field}[{number}]: unknown role {turn.get(role_key)!r} (expected one of {sorted(ROLES)})")
        content = turn.get(content_key)
        if not isinstance(content, str) or not content.strip():
            raise BadRecord(f"{field}[{number}]: '{content_key}' should be non-empty text")
        messages.append({"role": role, "content": content.strip()})
    system = 1 if messages[0]["role"] == "system" else 0
    for index, message in enumerate(messages[system:], start=system):
        expected = "user" if (index - system) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise BadRecord(f"turn {index + 1 - system} is from the {message['role']}; expected the {expected} "
                            "(an optional system prompt first, then user and assistant in turn)")
    if messages[-1]["role"] != "assistant":
        raise BadRecord("the conversation should end with an assistant turn (the answer to learn)")
    return messages


def to_messages(raw: dict, data_format: str, question_field: str = "question",
                answer_fields: list[str] = ("answer_en", "answer_zh")) -> list[dict]:
    if data_format == "qa":
        return _qa(raw, question_field, list(answer_fields))
    if data_format == "alpaca":
        return _alpaca(raw)
    if data_format == "messages":
        return _messages(raw)
    raise LoragridError(f"config key 'dataset.format': unknown format '{data_format}' (choose from {', '.join(FORMATS)})")


def read_records(records_path: Path, parts: list[dict], data_format: str, question_field: str,
                 answer_fields: list[str]):
    """Yield (where, conversation or None, reason) for every non-blank line of records.jsonl."""
    seen: dict[str, str] = {}
    with open(records_path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            file, unit, number = locate(parts, line_number)
            where = {"file": file, unit: number, "id": f"{file}, {unit} {number}"}
            try:
                try:
                    text = line.decode("utf-8").rstrip("\r\n")  # columns count within the line
                except UnicodeDecodeError as error:
                    raise BadRecord(f"not valid UTF-8 (byte 0x{line[error.start]:02x} at column {error.start + 1})") from None
                try:
                    raw = json.loads(text)
                except json.JSONDecodeError as error:
                    raise BadRecord(f"invalid JSON ({error.msg} at column {error.colno})") from None
                if not isinstance(raw, dict):
                    raise BadRecord(f"expected a JSON object, got {type(raw).__name__}")
                messages = to_messages(raw, data_format, question_field, answer_fields)
                key = json.dumps(messages, ensure_ascii=False, sort_keys=True)
                if key in seen:
                    raise BadRecord(f"duplicate of {seen[key]} (same conversation); a repeated record is trained on twice")
                seen[key] = where["id"]
            except BadRecord as error:
                yield where, None, str(error)
                continue
            yield where, {"id": where["id"], "messages": messages}, None


# --- prepare -------------------------------------------------------------------------------------

def _question_key(messages: list[dict]) -> str:
    # Case and spacing differences do not make a new question: such near-copies
    # must land in the same split, or held-out scores would flatter the model.
    asked = " ".join(m["content"] + " " + m.get("input", "") for m in messages if m["role"] == "user")
    return " ".join(asked.casefold().split())


def prepare(records_path: str | Path, out_dir: str | Path, *, data_format: str = "qa",
            question_field: str = "question", answer_fields: list[str] = ("answer_en", "answer_zh"),
            heldout_fraction: float = 0.1, heldout_min: int = 30, seed: int = 42, on_bad_record: str = "fail",
            display_name: str | None = None) -> dict:
    """Write train.jsonl, heldout.jsonl and prepare.json into `out_dir`.

    Records are located through the `parts` of the source.json beside `records_path` (written by
    fetch_dataset); without one, `records_path` is the user's JSONL file, named `display_name`.
    """
    records_path = Path(records_path)
    source_json = records_path.parent / "source.json"
    parts = read_json(source_json).get("parts") if source_json.exists() else None
    if parts is None:
        parts = [{"file": display_name or str(records_path), "start": 1, "count": float("inf"), "unit": "line", "first": 1}]
    records, rejected = [], []
    for where, record, reason in read_records(records_path, parts, data_format, question_field, list(answer_fields)):
        if record is None:
            if on_bad_record == "fail":
                raise LoragridError(f"{where['id']}: {reason} "
                                    "(set dataset.on_bad_record: skip to count and skip such records)")
            rejected.append({**{k: v for k, v in where.items() if k != "id"}, "reason": reason})
            log.warning("skipped %s: %s", where["id"], reason)
            continue
        records.append(record)
    if not records:
        raise LoragridError(f"{parts[0]['file']}: no valid records (config key 'dataset.format' is '{data_format}')")

    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(_question_key(record["messages"]), []).append(record)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_heldout = max(heldout_min, round(heldout_fraction * len(keys)))
    if n_heldout >= len(keys):
        raise LoragridError(
            f"{parts[0]['file']}: {len(keys)} distinct questions are too few for {n_heldout} held-out questions "
            "(config keys 'split.heldout_min' and 'split.heldout_fraction')"
        )
    heldout_keys = set(keys[:n_heldout])
    # One record per held-out question: a repeated question would count twice in every score.
    heldout = [groups[key][0] for key in keys[:n_heldout]]
    train = [record for key in keys[n_heldout:] for record in groups[key]]

    summary = {
        "source": parts[0]["file"] if len(parts) == 1 else [part["file"] for part in parts],
        "format": data_format,
        "records_read": len(records) + len(rejected),
        "records_valid": len(records),
        "distinct_questions": len(keys),
        "train": len(train),
        "heldout": len(heldout),
        "heldout_repeats_dropped": sum(len(groups[key]) - 1 for key in heldout_keys),
        "rejected_count": len(rejected),
        "rejected": rejected,
        "settings": {"format": data_format, "question_field": question_field, "answer_fields": list(answer_fields),
                     "heldout_fraction": heldout_fraction, "heldout_min": heldout_min, "seed": seed,
                     "on_bad_record": on_bad_record},
        "input_sha256": sha256_file(records_path),
    }
    assert not heldout_keys & {_question_key(r["messages"]) for r in train}
    with atomic_dir(out_dir) as staging:
        write_jsonl(staging / "train.jsonl", train)
        write_jsonl(staging / "heldout.jsonl", heldout)
        summary["output_sha256"] = {name: sha256_file(staging / name) for name in ("train.jsonl", "heldout.jsonl")}
        write_json(staging / "prepare.json", summary)
    log.info("prepared %d train and %d held-out records (%d rejected)", len(train), len(heldout), len(rejected))
    return summary
