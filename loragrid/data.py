"""Dataset files in, conversations out.

`gather_records` (used by fetch_dataset) reads .jsonl, .json (a list), .csv and .parquet files,
or a folder of them, into one records.jsonl and remembers which file and line each record came
from. `prepare` checks every record against its format (qa, alpaca, messages), turns it into a
conversation and splits off held-out questions.

JSONL files are copied line for line: a malformed line must be reported (or skipped) on its own,
with its line number, instead of failing the whole file. JSON lists and CSV files are parsed here
too, one record per line of records.jsonl, so a bad record is named by its number; only Parquet,
a binary format, is read by `datasets`, which either parses a file or rejects it whole.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import math
import random
import re
import reprlib
import sys
import unicodedata
from pathlib import Path

from .common import LoragridError, atomic_dir, read_json, sha256_file, verify_folder, write_json, write_jsonl

log = logging.getLogger("loragrid.data")

# suffix -> (reader, how a record is located in the user's file, number of the first record)
FILE_FORMATS = {
    ".jsonl": ("lines", "line", 1),
    ".json": ("json", "record", 1),
    ".csv": ("csv", "line", 2),  # line 1 is the header; a quoted line break moves the later records on
    ".parquet": ("parquet", "row", 1),
}
FORMATS = ("qa", "alpaca", "messages")
# sharegpt's `from` values and OpenAI's roles, as one vocabulary.
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


class BadRecord(Exception):
    """One record that does not fit its format; the message says what was expected."""


# --- parsing JSON ----------------------------------------------------------------------------------

def _json_int(literal: str) -> int:
    # Past Python's limit on digits (a guard against slow conversion) json.loads raises a bare ValueError.
    limit, digits = sys.get_int_max_str_digits(), len(literal.lstrip("-"))
    if limit and digits > limit:
        raise BadRecord(f"a number of {digits} digits, more than Python reads ({limit}); quote it if it is text")
    return int(literal)


def _loads(text: str):
    """json.loads, with valid JSON that Python cannot hold as a value (see _json_int) raised as BadRecord."""
    try:
        return json.loads(text, parse_int=_json_int)
    except RecursionError:
        raise BadRecord("arrays or objects nested too deeply to read") from None


def _json_line(row) -> bytes:
    text = json.dumps(row, ensure_ascii=False, default=str)
    try:
        return (text + "\n").encode()
    except UnicodeEncodeError:
        # A lone surrogate (a \ud800 escape in a JSON list) has no UTF-8 form; kept escaped,
        # prepare names the field that holds it instead of the writer failing with a traceback.
        return (json.dumps(row, default=str) + "\n").encode()


# --- reading files -------------------------------------------------------------------------------

def data_files(path: Path, display: str) -> list[tuple[Path, str]]:
    """The data files at `path` (one file or a folder, searched recursively) with their display names."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_FORMATS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise LoragridError(f"{display}: the folder holds no data files ({', '.join(FILE_FORMATS)})")
        named = [(file, f"{display.rstrip('/')}/{file.relative_to(path)}") for file in files]
        for _, name in named:
            # A name the file system holds as raw bytes would fail every message and output that names it.
            shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            if shown != name:
                raise LoragridError(f"{shown}: the file name is not valid UTF-8; rename the file")
        return named
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


def _json_list(file: Path, display: str) -> list:
    text = _utf8_text(file, display).removeprefix("\ufeff")  # a BOM (Notepad's UTF-8) is not JSON; as for CSV
    try:
        parsed = _loads(text)
    except json.JSONDecodeError as error:
        raise LoragridError(f"{display}, line {error.lineno}: "
                            f"invalid JSON ({error.msg.removesuffix(' at')} at column {error.colno})") from None
    except BadRecord as error:  # no line: json.loads tells where a syntax error is, not where a value is
        raise LoragridError(f"{display}: {error}") from None
    if not isinstance(parsed, list):
        raise LoragridError(f"{display}: expected a JSON list of records, got a {type(parsed).__name__} "
                            "(one record per line belongs in a .jsonl file)")
    return parsed


def _csv_rows(file: Path, display: str) -> tuple[list[dict], list[int]]:
    """The records of a CSV file, every cell as the text it holds, and the line each record starts on.

    Python's csv module, not datasets (pandas): pandas turns a column of numbers into ints and an answer
    "NA" or "null" into a missing value, and knows records, not the physical lines a quoted line break
    adds. `strict` makes a quote that is never closed an error instead of swallowing the rest of the file.
    """
    text = _utf8_text(file, display).removeprefix("\ufeff")  # a spreadsheet's BOM is not part of the header
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, rows, starts, end = None, [], [], 0
    limit = csv.field_size_limit(2**31 - 1)  # csv's default of 128 KiB a field would reject a long answer
    try:
        for cells in reader:
            start, end = end + 1, reader.line_num
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue  # a blank line, as pandas skips it
            if header is None:
                header = cells
                twice = next((name for name in header if name and header.count(name) > 1), None)
                if twice is not None:
                    raise LoragridError(f"{display}, line {start}: the header names the column {twice!r} twice")
                continue
            if any(cell.strip() for cell in cells[len(header):]):
                raise LoragridError(f"{display}, line {start}: {len(cells)} fields, but the header names "
                                    f"{len(header)} columns (quote a field that holds a comma)")
            # A column without a name cannot be a field; a row cut short leaves its last fields missing.
            row = {name: cells[i] if i < len(cells) else None for i, name in enumerate(header) if name}
            rows.append(row)
            starts.append(start)
    except csv.Error as error:
        reason = "a quote opened in this record is never closed" if str(error) == "unexpected end of data" else error
        raise LoragridError(f"{display}, line {end + 1}: not valid CSV ({reason})") from None
    finally:
        csv.field_size_limit(limit)
    return rows, starts


def _parquet_rows(file: Path, display: str, scratch: Path) -> list[dict]:
    from datasets import load_dataset

    try:
        return load_dataset("parquet", data_files=str(file), split="train", cache_dir=str(scratch)).to_list()
    except Exception as error:  # datasets raises many types for a file it cannot parse
        raise LoragridError(f"{display}: datasets cannot read it as parquet: {error}") from error


def _file_records(file: Path, display: str, scratch: Path) -> tuple[list[bytes], list[int]]:
    """One file's lines for records.jsonl and the number (line, record or row) of each in the user's file."""
    reader, unit, first = FILE_FORMATS[file.suffix]
    if reader == "lines":
        lines = file.read_bytes().removeprefix(codecs.BOM_UTF8).split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        # Kept byte for byte but for a leading BOM (bad lines included): prepare judges each line and names it.
        return [line.rstrip(b"\r") + b"\n" for line in lines], list(range(first, first + len(lines)))
    if reader == "csv":
        rows, numbers = _csv_rows(file, display)
    else:
        rows = _json_list(file, display) if reader == "json" else _parquet_rows(file, display, scratch)
        numbers = list(range(first, first + len(rows)))
    lines = []
    for row, number in zip(rows, numbers):
        try:
            lines.append(_json_line(row))
        except RecursionError:
            raise LoragridError(f"{display}, {unit} {number}: "
                                "arrays or objects nested too deeply to write") from None
    return lines, numbers


def gather_records(path: Path, display: str, target: Path, scratch: Path) -> list[dict]:
    """Write every record under `path` to `target` (JSON lines) and return where each file's records went.

    Each entry of the returned list ("parts") maps lines of `target` back to the user's file:
    {file, start (first line in target), count, unit (line/record/row), first (its number in the file)},
    and `lines`, each record's line, where a CSV record spans lines or blank lines lie between records.
    """
    parts, written = [], 0
    with open(target, "wb") as out:
        for file, name in data_files(path, display):
            lines, numbers = _file_records(file, name, scratch)
            if not any(line.strip() for line in lines):
                raise LoragridError(f"{name}: the file is empty (expected records of a dataset)")
            out.writelines(lines)
            part = {"file": name, "start": written + 1, "count": len(lines), "unit": FILE_FORMATS[file.suffix][1],
                    "first": numbers[0]}
            if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
                part["lines"] = numbers
            parts.append(part)
            written += len(lines)
    return parts


def locate(parts: list[dict], line: int) -> tuple[str, str, int]:
    """(file, unit, number) of line `line` of records.jsonl in the user's terms."""
    for part in parts:
        if part["start"] <= line < part["start"] + part["count"]:
            if "lines" in part:
                return part["file"], part["unit"], part["lines"][line - part["start"]]
            return part["file"], part["unit"], part["first"] + line - part["start"]
    raise ValueError(f"line {line} is outside every part")


# --- records to conversations --------------------------------------------------------------------

def _kind(value) -> str:
    # JSON's NaN and Infinity parse to Python floats; "got float" would send the user looking for a number.
    if value is None:
        return "null"  # JSON's word, not Python's NoneType
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    return type(value).__name__


def _clean(text: str, label: str) -> str:
    """`text` trimmed (see _trim), once it is known to be text that UTF-8 (the writer) and a tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:  # json.loads accepts a lone "\ud800"; only the writer would fail
        raise BadRecord(f"{label} holds an unpaired surrogate (\\u{ord(text[error.start]):04x}), "
                        "which is not valid Unicode") from None
    if "\0" in text:
        # Never part of real text; C libraries end a string at it. Common in a UTF-16 file read as UTF-8.
        raise BadRecord(f"{label} holds a NUL character (\\u0000), which is not text (a binary or UTF-16 file?)")
    return _trim(text)


_LEADING_BLANK_LINES = re.compile(r"\A(?:[^\S\n]*\n)+")


def _trim(text: str) -> str:
    # A multi-line text may be code, whose first line's indentation is syntax ("    if a:\n        c()"):
    # only blank lines before it and whitespace after the text go. A single line is scraped prose, where a
    # leading space (" Paris") is noise.
    text = _LEADING_BLANK_LINES.sub("", text.rstrip())
    return text if "\n" in text else text.strip()


def _text(raw: dict, field: str, what: str | None = None) -> str:
    value = raw.get(field)
    if value is None and field in raw:  # present, but null: not a field named otherwise
        raise BadRecord(f"field '{field}' is null")
    if value is None:
        raise BadRecord(f"missing field '{field}'" + (f" ({what})" if what else ""))
    if not isinstance(value, str):
        raise BadRecord(f"field '{field}' should be text, got {_kind(value)}")
    value = _clean(value, f"field '{field}'")
    if not value:
        raise BadRecord(f"field '{field}' is empty")
    return value


def _system(raw: dict) -> list[dict]:
    value = raw.get("system")
    value = _clean(value, "field 'system'") if isinstance(value, str) else ""
    return [{"role": "system", "content": value}] if value else []


def _fields_of(raw: dict) -> str:
    return f"the record has {reprlib.repr(sorted(map(str, raw)))}"


def _qa(raw: dict, question_field: str, answer_fields: list[str]) -> list[dict]:
    # A dataset whose fields are named otherwise fails on every record: say which keys name them.
    if question_field not in raw:
        raise BadRecord(f"missing field '{question_field}' (the question: config key dataset.question_field; "
                        f"{_fields_of(raw)})")
    question = _text(raw, question_field)
    # A column that a Parquet file leaves empty, or a CSV row cut short, arrives as None: present, but empty.
    present = [field for field in answer_fields if field in raw]
    if not present:
        raise BadRecord(f"none of the answer fields {answer_fields} is present (config key dataset.answer_fields; "
                        f"{_fields_of(raw)})")
    chosen = next((f for f in present if isinstance(raw[f], str) and raw[f].strip()), None)
    wrong_type = next((f for f in present if raw[f] is not None and not isinstance(raw[f], str)), None)
    if chosen is None and wrong_type:
        raise BadRecord(f"answer field '{wrong_type}' should be text, got {_kind(raw[wrong_type])}")
    if chosen is None:
        raise BadRecord(f"answer field '{present[0]}' is empty (an empty answer teaches the model to say nothing)")
    answer = _clean(raw[chosen], f"answer field '{chosen}'")
    return [*_system(raw), {"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _alpaca(raw: dict) -> list[dict]:
    user = {"role": "user", "content": _text(raw, "instruction")}
    context = raw.get("input")
    if context is not None and not isinstance(context, str):
        raise BadRecord(f"field 'input' should be text, got {_kind(context)}")
    context = _clean(context, "field 'input'") if context else ""
    if context:  # an empty input is the common case: the instruction says it all
        user["input"] = context
    return [*_system(raw), user, {"role": "assistant", "content": _text(raw, "output", "the answer")}]


def _turn(turn, field: str, number: int) -> dict:
    if not isinstance(turn, dict):
        raise BadRecord(f"{field}[{number}] should be an object, got {_kind(turn)}")
    role_key, content_key = ("role", "content") if "role" in turn else ("from", "value")
    name = turn.get(role_key)
    if name is None:
        raise BadRecord(f"{field}[{number}]: missing 'role' (OpenAI) or 'from' (sharegpt)")
    if not isinstance(name, str):
        raise BadRecord(f"{field}[{number}]: '{role_key}' should be text, got {_kind(name)}")
    role = ROLES.get(name.lower())
    if role is None:  # reprlib: a role of a million characters makes a message of 30
        raise BadRecord(f"{field}[{number}]: unknown role {reprlib.repr(name)} (expected one of {sorted(ROLES)})")
    content = turn.get(content_key)
    content = _clean(content, f"{field}[{number}]: '{content_key}'") if isinstance(content, str) else ""
    if not content:
        raise BadRecord(f"{field}[{number}]: '{content_key}' should be non-empty text")
    return {"role": role, "content": content}


def _messages(raw: dict) -> list[dict]:
    field = next((f for f in ("messages", "conversations") if f in raw), None)
    if field is None:
        raise BadRecord("missing field 'messages' (OpenAI role/content) or 'conversations' (sharegpt from/value)")
    turns = raw[field]
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"field '{field}' should be a non-empty list of turns")
    messages = _system(raw) + [_turn(turn, field, number) for number, turn in enumerate(turns)]  # JSON indexes from 0
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
    raise LoragridError(f"config key 'dataset.format': unknown format '{data_format}' "
                        f"(choose from {', '.join(FORMATS)})")


def _parse_line(line: bytes) -> dict:
    try:
        text = line.decode("utf-8").rstrip("\r\n")  # columns count within the line
    except UnicodeDecodeError as error:
        raise BadRecord(f"not valid UTF-8 (byte 0x{line[error.start]:02x} at column {error.start + 1})") from None
    try:
        raw = _loads(text)
    except json.JSONDecodeError as error:
        raise BadRecord(f"invalid JSON ({error.msg.removesuffix(' at')} at column {error.colno})") from None
    if not isinstance(raw, dict):
        raise BadRecord(f"expected a JSON object, got {_kind(raw)}")
    return raw


def read_records(records_path: Path, parts: list[dict], data_format: str, question_field: str,
                 answer_fields: list[str]):
    """Yield (where, conversation or None, reason) for every non-blank line of records.jsonl."""
    seen: dict[str, str] = {}
    with open(records_path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line_number == 1:  # prepare run on the user's own JSONL file (fetch_dataset strips it)
                line = line.removeprefix(codecs.BOM_UTF8)
            if not line.strip():
                continue
            file, unit, number = locate(parts, line_number)
            where = {"file": file, unit: number, "id": f"{file}, {unit} {number}"}
            try:
                messages = to_messages(_parse_line(line), data_format, question_field, answer_fields)
                key = json.dumps(messages, ensure_ascii=False, sort_keys=True)
                if key in seen:
                    raise BadRecord(f"duplicate of {seen[key]} (same conversation); "
                                    "a repeated record is trained on twice")
                seen[key] = where["id"]
            except BadRecord as error:
                yield where, None, str(error)
                continue
            yield where, {"id": where["id"], "messages": messages}, None


# --- prepare -------------------------------------------------------------------------------------

def _spelling_key(messages: list[dict]) -> str:
    # Case and spacing differences do not make a new question: such near-copies
    # must land in the same split, or held-out scores would flatter the model.
    asked = " ".join(m["content"] + " " + m.get("input", "") for m in messages if m["role"] == "user")
    return " ".join(asked.casefold().split())


# Scripts written without spaces between words: a space between two of their characters is layout.
_CJK = ("\u1100-\u11ff\u2e80-\u2fdf\u3005-\u3007\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf"
        "\u4e00-\u9fff\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\U00020000-\U0003134f")
_CJK_SPACE = re.compile(f"(?<=[{_CJK}])\\s+(?=[{_CJK}])")
_IS_CJK = re.compile(f"[{_CJK}]")
# Never part of a word: they end or join clauses, or enclose (the categories Ps, Pe, Pi and Pf, too).
_CLAUSE = frozenset(',;!?"¿¡。、…‥')
# Part of a word only between two of its letters or digits: "3.5", "node.js", "10:30", "don't", "e-mail";
# at a word's end they close a sentence, a quotation or an emphasis.
_INSIDE = frozenset(".:'*")
_INVISIBLE = {code: None for code in range(0xFE00, 0xFE10)} | {0x2019: "'"}  # ’ is an apostrophe as often as not


def _word_char(char: str) -> bool:
    return (char.isalnum() or char == "_") and not _IS_CJK.match(char)


def _punctuation(match: re.Match) -> str:
    """A punctuation mark as the key keeps it: itself where it belongs to a word ("C#", "3.5"), else a space."""
    char, text, at = match.group(), match.string, match.start()
    category = unicodedata.category(char)
    if category[0] != "P":
        return char if category != "Cf" else ""  # symbols and emoji are kept; invisible format characters go
    before, after = _word_char(text[at - 1]) if at else False, _word_char(text[at + 1:at + 2] or " ")
    if char in _CLAUSE or category in ("Ps", "Pe", "Pi", "Pf"):
        return " "
    if char in _INSIDE or category == "Pd":
        return char if before and after else " "
    return char if before else " "  # "#", "%", "&", "/": kept after a word ("C#", "100%"), not before one


def _question_key(messages: list[dict]) -> str:
    """The question a record asks, as the held-out split groups it.

    Beyond case and spacing (`_spelling_key`), width and compatibility forms (NFKC: a full-width "？" is
    "?"), punctuation between words or at the end, and the spaces around symbols or between CJK characters
    do not make a new question: "What is 2+2?" and "what is 2 + 2 ？" are twins, so are "瑞利散射是什么"
    and "瑞利 散射 是什么". Punctuation that belongs to a word is kept ("What is C#?" is not "What is C?").
    Symbols, emoji and kept punctuation are each a word of their own, or every question that differs only
    in its emoji would be one question.
    """
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", _spelling_key(messages)).casefold())
    marked = re.sub(r"[^\w\s]", _punctuation, folded.translate(_INVISIBLE))
    key = _CJK_SPACE.sub("", " ".join(re.findall(r"\w+|\S", marked)))
    # A question of punctuation alone ("?", "...") has no words left: as spelled, or every one is one question.
    return key or _spelling_key(messages)


def _split(records: list[dict], heldout_fraction: float, heldout_min: int, seed: int, source: str):
    """(train, held-out records, counts): every question's records stay in one split."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(_question_key(record["messages"]), []).append(record)
    # Shuffled from the order of the older, case-and-spacing key of each group's first record:
    # data without twins splits exactly as it did before twins were merged.
    order = {key: _spelling_key(group[0]["messages"]) for key, group in groups.items()}
    keys = sorted(groups, key=order.__getitem__)
    random.Random(seed).shuffle(keys)
    n_heldout = max(heldout_min, round(heldout_fraction * len(keys)))
    if n_heldout >= len(keys):
        raise LoragridError(
            f"{source}: {len(keys)} distinct questions are too few for {n_heldout} held-out questions "
            "(config keys 'split.heldout_min' and 'split.heldout_fraction')"
        )
    # One record per held-out question: a repeated question would count twice in every score.
    heldout = [groups[key][0] for key in keys[:n_heldout]]
    train = [record for key in keys[n_heldout:] for record in groups[key]]
    assert not set(keys[:n_heldout]) & {_question_key(r["messages"]) for r in train}
    counts = {
        "distinct_questions": len(keys),
        # Records that share a question only through the normalization beyond case and spacing.
        "question_twins_merged": sum(_spelling_key(r["messages"]) != order[key] for key in keys for r in groups[key]),
        "heldout_repeats_dropped": sum(len(groups[key]) - 1 for key in keys[:n_heldout]),
    }
    return train, heldout, counts


def _no_valid_records(parts: list[dict], rejected: list[dict], data_format: str) -> LoragridError:
    """The error for data without one valid record (on_bad_record: skip): every file read, with how many records
    it had and why its first was skipped. A folder's files may fail each for its own reason, and naming only
    the first file sent the user looking there alone."""
    by_file: dict[str, list[dict]] = {}
    for rejection in rejected:
        by_file.setdefault(rejection["file"], []).append(rejection)

    def skipped(file: str) -> str:
        if file not in by_file:
            return "no records: the file is empty or blank"  # prepare's own JSONL file; fetch_dataset refuses one
        first, count = by_file[file][0], len(by_file[file])
        unit, number = next((key, value) for key, value in first.items() if key not in ("file", "reason"))
        return f"{count} record{'s' * (count != 1)} skipped, the first ({unit} {number}): {first['reason']}"

    setting = f"config key 'dataset.format' is '{data_format}'"
    if len(parts) == 1:
        return LoragridError(f"{parts[0]['file']}: no valid records ({setting}); {skipped(parts[0]['file'])}")
    files = "; ".join(f"{part['file']}: {skipped(part['file'])}" for part in parts)
    return LoragridError(f"no valid records in any of the {len(parts)} files read ({setting}): {files}")


def prepare(records_path: str | Path, out_dir: str | Path, *, data_format: str = "qa",
            question_field: str = "question", answer_fields: list[str] = ("answer_en", "answer_zh"),
            heldout_fraction: float = 0.1, heldout_min: int = 30, seed: int = 42, on_bad_record: str = "fail",
            display_name: str | None = None) -> dict:
    """Write train.jsonl, heldout.jsonl and prepare.json into `out_dir`.

    Records are located through the `parts` of the source.json beside `records_path` (written by
    fetch_dataset); without one, `records_path` is the user's JSONL file, named `display_name`.
    prepare.json counts `question_twins_merged`: records grouped with a question that is spelt differently
    beyond case and spacing (see _question_key), so they share its split.
    """
    records_path = Path(records_path)
    source_json = records_path.parent / "source.json"
    if source_json.exists():
        verify_folder(records_path.parent)  # fetch_dataset's folder: records.jsonl as it was fetched
    parts = read_json(source_json).get("parts") if source_json.exists() else None
    if parts is None:
        parts = [{"file": display_name or str(records_path), "start": 1, "count": float("inf"), "unit": "line",
                  "first": 1}]
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
        raise _no_valid_records(parts, rejected, data_format)
    train, heldout, counts = _split(records, heldout_fraction, heldout_min, seed, parts[0]["file"])

    summary = {
        "source": parts[0]["file"] if len(parts) == 1 else [part["file"] for part in parts],
        "format": data_format,
        "records_read": len(records) + len(rejected),
        "records_valid": len(records),
        "distinct_questions": counts["distinct_questions"],
        "question_twins_merged": counts["question_twins_merged"],
        "train": len(train),
        "heldout": len(heldout),
        "heldout_repeats_dropped": counts["heldout_repeats_dropped"],
        "rejected_count": len(rejected),
        "rejected": rejected,
        "settings": {"format": data_format, "question_field": question_field, "answer_fields": list(answer_fields),
                     "heldout_fraction": heldout_fraction, "heldout_min": heldout_min, "seed": seed,
                     "on_bad_record": on_bad_record},
        "input_sha256": sha256_file(records_path),
    }
    with atomic_dir(out_dir) as staging:
        write_jsonl(staging / "train.jsonl", train)
        write_jsonl(staging / "heldout.jsonl", heldout)
        summary["output_sha256"] = {name: sha256_file(staging / name) for name in ("train.jsonl", "heldout.jsonl")}
        write_json(staging / "prepare.json", summary)
    log.info("prepared %d train and %d held-out records (%d rejected)", len(train), len(heldout), len(rejected))
    return summary
