"""Property-based: whatever a data file holds, gather_records and prepare return or raise LoragridError.

Never another exception: a traceback would hide which file and line is at fault. Random records
mix the formats' real field names with random keys and values of every JSON type (NaN, huge
integers and lone surrogates included); random lines and CSV text add bytes that are not JSON or
not UTF-8. Three valid records lead each file so that prepare reaches the split and the writer.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loragrid.common import LoragridError, read_jsonl, write_json
from loragrid.data import FORMATS, gather_records, prepare

FIELDS = ["question", "answer_en", "answer_zh", "instruction", "input", "output", "system", "messages",
          "conversations", "role", "content", "from", "value"]
GOOD = {
    "qa": [{"question": f"Question {i}?", "answer_en": f"Answer {i}"} for i in range(3)],
    "alpaca": [{"instruction": f"Task {i}", "output": f"Done {i}"} for i in range(3)],
    "messages": [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Yo {i}"}]}
                 for i in range(3)],
}
# Three rows valid for qa and alpaca alike (a CSV cell cannot hold the list a conversation needs).
CSV_HEADER = "question,answer_en,instruction,output,input,system\r\n"
CSV_GOOD = "".join(f"Question {i}?,Answer {i},Task {i},Done {i},,\r\n" for i in range(3))
# Valid JSON that Python cannot hold, or that breaks the writer: drawn now and then as a whole line or value.
EXTREMES = ["[" * 50_000 + "]" * 50_000, "9" * 5000, '"\\ud800"', '"a\\u0000b"', "NaN", "-Infinity", "1e999"]

characters = st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                       st.sampled_from("\0\n\r\t \"',;?？Ａ\ufeff\u2028"))
texts = (st.text(characters, max_size=10)
         | st.sampled_from(["user", "assistant", "human", "gpt", "system", "robot", ""]))
scalars = st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63) | st.floats() | texts
keys = st.sampled_from(FIELDS) | texts
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                      max_leaves=12)
roles = st.sampled_from(["user", "assistant", "human", "gpt", "system", "robot"]) | values
turns = st.lists(st.fixed_dictionaries({"role": roles, "content": texts | values})
                 | st.fixed_dictionaries({"from": roles, "value": texts | values}) | values, max_size=4)


def records(data_format: str):
    # A valid record with some fields changed or added reaches the checks behind the first missing field.
    near_valid = st.builds(lambda record, changes: {**record, **changes}, st.sampled_from(GOOD[data_format]),
                           st.dictionaries(keys, texts | values | turns, max_size=3))
    return near_valid | st.dictionaries(keys, values, max_size=6) | values


def json_lines(data_format: str):
    return st.one_of(
        records(data_format).map(json.dumps).map(str.encode),  # ensure_ascii: a surrogate travels as \ud800
        st.binary(max_size=40).map(lambda raw: raw.replace(b"\n", b" ")),
        st.sampled_from(EXTREMES).map(lambda value: f'{{"question": "q", "answer_en": {value}}}'.encode()),
    )


cells = texts | st.sampled_from(["NA", "null", "None", "nan", "1", "2.5", '"quoted, with comma"', '"a ""b""\nc"'])
csv_text = st.text(st.one_of(characters, st.sampled_from(',,,""\n\r\n')), max_size=120) | st.lists(
    st.lists(cells, max_size=6).map(",".join), max_size=6).map("\r\n".join)


def _gather_and_prepare(name: str, content: bytes) -> None:
    """Run fetch_dataset's gather and prepare for every format and on_bad_record; check what comes back."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / name).write_bytes(content)
        try:
            parts = gather_records(folder / name, name, folder / "records.jsonl", folder / "scratch")
        except LoragridError as error:
            assert str(error).startswith(name) and str(error).encode("utf-8")
            return
        write_json(folder / "source.json", {"parts": parts})
        for data_format in FORMATS:
            for on_bad_record in ("skip", "fail"):
                out = folder / f"{data_format}-{on_bad_record}"
                try:
                    summary = prepare(folder / "records.jsonl", out, data_format=data_format, heldout_min=1,
                                      on_bad_record=on_bad_record)
                except LoragridError as error:
                    message = str(error)
                    assert message.startswith(name) and message.encode("utf-8")  # a log file takes it
                    if message.endswith("(set dataset.on_bad_record: skip to count and skip such records)"):
                        assert on_bad_record == "fail" and message.startswith((f"{name}, line ", f"{name}, record "))
                    continue
                assert summary["records_read"] == summary["records_valid"] + summary["rejected_count"]
                assert all(r["file"] == name and r["reason"] for r in summary["rejected"])
                assert len(read_jsonl(out / "train.jsonl")) == summary["train"]
                assert len(read_jsonl(out / "heldout.jsonl")) == summary["heldout"]


FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(st.sampled_from(FORMATS).flatmap(lambda fmt: st.tuples(st.just(fmt), st.lists(json_lines(fmt), max_size=8))),
       st.randoms(use_true_random=False))
def test_fuzz_jsonl(drawn, random):
    data_format, lines = drawn
    lines = [json.dumps(record).encode() for record in GOOD[data_format]] + lines
    random.shuffle(lines)
    _gather_and_prepare("d.jsonl", b"\n".join(lines) + b"\n")


@FUZZ
@given(st.sampled_from(FORMATS).flatmap(lambda fmt: st.tuples(st.just(fmt), st.lists(records(fmt), max_size=8))))
def test_fuzz_json_list(drawn):
    data_format, elements = drawn
    _gather_and_prepare("d.json", json.dumps(GOOD[data_format] + elements).encode())


@FUZZ
@given(csv_text, st.booleans())
def test_fuzz_csv(text, keep_header):
    text = (CSV_HEADER + CSV_GOOD if keep_header else "") + text
    _gather_and_prepare("d.csv", text.encode("utf-8", "surrogatepass"))  # a surrogate is bytes no UTF-8 reader takes
