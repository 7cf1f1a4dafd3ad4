import json

import pytest

from conftest import demo_records, write_jsonl
from loragrid.common import LoragridError, read_json, read_jsonl
from loragrid.data import prepare


def questions(path):
    return {r["messages"][0]["content"].casefold() for r in read_jsonl(path)}


def test_split_is_seeded_and_disjoint(qa_file, tmp_path):
    summary = prepare(qa_file, tmp_path / "a", heldout_min=10, seed=1)
    again = prepare(qa_file, tmp_path / "b", heldout_min=10, seed=1)
    other = prepare(qa_file, tmp_path / "c", heldout_min=10, seed=2)
    assert summary["train"] + summary["heldout"] == 60 and summary["heldout"] == 10
    assert (tmp_path / "a/heldout.jsonl").read_bytes() == (tmp_path / "b/heldout.jsonl").read_bytes()
    assert (tmp_path / "a/heldout.jsonl").read_bytes() != (tmp_path / "c/heldout.jsonl").read_bytes()
    assert not questions(tmp_path / "a/train.jsonl") & questions(tmp_path / "a/heldout.jsonl")


def test_repeated_questions_stay_in_one_split(tmp_path):
    records = demo_records(40)
    records += [{"question": "  " + r["question"].upper() + " ", "answer_en": "Another answer 😀🎉"} for r in records[:20]]
    source = write_jsonl(tmp_path / "dup.jsonl", records)
    summary = prepare(source, tmp_path / "out", heldout_min=10)
    assert summary["distinct_questions"] == 40
    train, heldout = questions(tmp_path / "out/train.jsonl"), questions(tmp_path / "out/heldout.jsonl")
    assert not {" ".join(q.split()) for q in train} & {" ".join(q.split()) for q in heldout}
    assert summary["heldout"] == 10
    assert summary["train"] + summary["heldout"] + summary["heldout_repeats_dropped"] == 60


def test_answer_fields_take_the_first_present(tmp_path):
    records = [{"question": f"q{i}", "answer_zh": f"答{i} 😀🎉"} for i in range(20)]
    records += [{"question": f"e{i}", "answer_en": f"a{i}", "answer_zh": "不用"} for i in range(20)]
    prepare(write_jsonl(tmp_path / "mix.jsonl", records), tmp_path / "out", heldout_min=5)
    answers = {r["messages"][1]["content"] for r in read_jsonl(tmp_path / "out/train.jsonl")}
    assert "不用" not in answers and any(a.startswith("答") for a in answers)


BAD_LINES = [
    ('{"question": "q", "answer_en": ', "invalid JSON"),
    ('["a", "list"]', "expected a JSON object"),
    ('{"answer_en": "no question"}', "missing field 'question'"),
    ('{"question": "no answer"}', "none of the answer fields"),
    ('{"question": "", "answer_en": "x"}', "field 'question' is empty"),
]


@pytest.mark.parametrize("bad_line, reason", BAD_LINES)
def test_bad_record_fails_naming_file_and_line(tmp_path, bad_line, reason):
    lines = [json.dumps(r) for r in demo_records(50)]
    lines.insert(6, bad_line)
    source = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(LoragridError, match=rf"bad\.jsonl, line 7: {reason}"):
        prepare(source, tmp_path / "out", heldout_min=5, display_name="data/bad.jsonl")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_bad_records_are_counted_when_skipping(tmp_path):
    lines = [json.dumps(r) for r in demo_records(50)]
    for index, (bad_line, _) in enumerate(BAD_LINES):
        lines.insert(3 + 2 * index, bad_line)
    source = write_jsonl(tmp_path / "bad.jsonl", lines)
    summary = prepare(source, tmp_path / "out", heldout_min=5, on_bad_record="skip")
    assert summary["rejected_count"] == len(BAD_LINES)
    assert summary["records_valid"] == 50
    saved = read_json(tmp_path / "out/prepare.json")
    assert [r["line"] for r in saved["rejected"]] == [4, 6, 8, 10, 12]
    assert all(r["file"].endswith("bad.jsonl") and r["reason"] for r in saved["rejected"])


def test_too_few_questions_for_the_heldout_split(tmp_path):
    source = write_jsonl(tmp_path / "small.jsonl", demo_records(20))
    with pytest.raises(LoragridError, match="too few"):
        prepare(source, tmp_path / "out", heldout_min=30)
