import json
import os
import random
import re

import pytest

from conftest import demo_records, write_jsonl
from loragrid.common import LoragridError, read_json, read_jsonl
from loragrid.data import prepare


def questions(path):
    return {r["messages"][0]["content"].casefold() for r in read_jsonl(path)}


def test_split_is_seeded_and_disjoint(qa_file, tmp_path):
    summary = prepare(qa_file, tmp_path / "a", heldout_min=10, seed=1)
    prepare(qa_file, tmp_path / "b", heldout_min=10, seed=1)
    prepare(qa_file, tmp_path / "c", heldout_min=10, seed=2)
    assert summary["train"] + summary["heldout"] == 60 and summary["heldout"] == 10
    assert (tmp_path / "a/heldout.jsonl").read_bytes() == (tmp_path / "b/heldout.jsonl").read_bytes()
    assert (tmp_path / "a/heldout.jsonl").read_bytes() != (tmp_path / "c/heldout.jsonl").read_bytes()
    assert not questions(tmp_path / "a/train.jsonl") & questions(tmp_path / "a/heldout.jsonl")


def test_repeated_questions_stay_in_one_split(tmp_path):
    records = demo_records(40)
    records += [{"question": "  " + r["question"].upper() + " ", "answer_en": "Another answer 😀🎉"}
                for r in records[:20]]
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


def _write_formats(folder, records):
    """The same records as .jsonl, .json (a list), .csv and .parquet."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "d.jsonl", records)
    (folder / "d.json").write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    pd.DataFrame(records).to_csv(folder / "d.csv", index=False)
    pd.DataFrame(records).to_parquet(folder / "d.parquet")


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.parquet"])
def test_every_file_format_gives_the_same_split(tmp_path, name):
    from loragrid.fetch import fetch_dataset

    records = [{"question": r["question"], "answer_en": r["answer_en"]} for r in demo_records(60)]
    _write_formats(tmp_path / "files", records)
    write_jsonl(tmp_path / "reference.jsonl", records)
    expected = prepare(tmp_path / "reference.jsonl", tmp_path / "expected", heldout_min=10)
    fetch_dataset(f"local:{tmp_path / 'files' / name}", tmp_path / "dataset")
    summary = prepare(tmp_path / "dataset" / "records.jsonl", tmp_path / "out", heldout_min=10)
    assert summary["records_valid"] == 60 and summary["source"].endswith(name)
    strip = lambda rows: [r["messages"] for r in rows]  # noqa: E731 - ids name the file, contents must match
    for split in ("train.jsonl", "heldout.jsonl"):
        assert strip(read_jsonl(tmp_path / "out" / split)) == strip(read_jsonl(tmp_path / "expected" / split))
    assert expected["train"] == summary["train"]


def test_a_folder_of_files_and_messages_that_name_each_file(tmp_path):
    import pandas as pd

    from loragrid.fetch import fetch_dataset

    records = [{"question": r["question"], "answer_en": r["answer_en"]} for r in demo_records(60)]
    folder = tmp_path / "data"
    (folder / "more").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", records[:20])
    pd.DataFrame(records[20:40] + [{"question": "empty answer?", "answer_en": ""}]).to_csv(
        folder / "b.csv", index=False)
    pd.DataFrame(records[40:]).to_parquet(folder / "more" / "c.parquet")
    (folder / "README.md").write_text("not data")
    provenance = fetch_dataset(f"local:{folder}", tmp_path / "dataset")
    assert [(p["file"], p["count"]) for p in provenance["parts"]] == [
        (f"{folder}/a.jsonl", 20), (f"{folder}/b.csv", 21), (f"{folder}/more/c.parquet", 20)]
    with pytest.raises(LoragridError, match=r"b\.csv, line 22: answer field 'answer_en' is empty"):
        prepare(tmp_path / "dataset" / "records.jsonl", tmp_path / "out", heldout_min=10)
    summary = prepare(tmp_path / "dataset" / "records.jsonl", tmp_path / "out", heldout_min=10, on_bad_record="skip")
    assert summary["records_valid"] == 60
    assert summary["rejected"] == [{"file": f"{folder}/b.csv", "line": 22, "reason": summary["rejected"][0]["reason"]}]
    ids = {r["id"] for r in read_jsonl(tmp_path / "out/train.jsonl")}
    assert any(i.startswith(f"{folder}/more/c.parquet, row ") for i in ids)


def test_a_folder_without_a_valid_record_names_every_file_and_its_first_reason(tmp_path):
    """The error named only the first file, though each file of a folder may fail for its own reason."""
    from loragrid.fetch import fetch_dataset

    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"q": "no question field?", "answer_en": "x"}] * 2)
    (folder / "b.csv").write_text("question,answer\nWhy?,an answer in the wrong column\n")
    fetch_dataset(f"local:{folder}", tmp_path / "dataset")
    with pytest.raises(LoragridError) as error:
        prepare(tmp_path / "dataset/records.jsonl", tmp_path / "out", heldout_min=5, on_bad_record="skip")
    assert str(error.value) == (
        "no valid records in any of the 2 files read (config key 'dataset.format' is 'qa'): "
        f"{folder}/a.jsonl: 2 records skipped, the first (line 1): missing field 'question' (the question: config "
        "key dataset.question_field; the record has ['answer_en', 'q']); "
        f"{folder}/b.csv: 1 record skipped, the first (line 2): none of the answer fields ['answer_en', "
        "'answer_zh'] is present (config key dataset.answer_fields; the record has ['answer', 'question'])")
    assert not (tmp_path / "out").exists()
    with pytest.raises(LoragridError, match=r"^data/a\.jsonl: no valid records \(config key 'dataset\.format' is "
                                            r"'qa'\); 2 records skipped, the first \(line 1\): missing field"):
        prepare(folder / "a.jsonl", tmp_path / "out", display_name="data/a.jsonl", on_bad_record="skip")


def test_alpaca_records_keep_their_input_and_ignore_an_empty_one(tmp_path):
    records = [{"instruction": f"Translate {i}", "input": f"word {i}" if i % 2 else "", "output": f"mot {i}"}
               for i in range(30)]
    records.append({"instruction": "Summarise", "output": "ok", "system": "You are terse."})
    prepare(write_jsonl(tmp_path / "a.jsonl", records), tmp_path / "out", data_format="alpaca", heldout_min=3)
    rows = {r["messages"][-2]["content"]: r["messages"] for r in read_jsonl(tmp_path / "out/train.jsonl")
            + read_jsonl(tmp_path / "out/heldout.jsonl")}
    assert rows["Translate 1"] == [{"role": "user", "content": "Translate 1", "input": "word 1"},
                                   {"role": "assistant", "content": "mot 1"}]
    assert rows["Translate 2"] == [{"role": "user", "content": "Translate 2"},
                                   {"role": "assistant", "content": "mot 2"}]
    assert rows["Summarise"][0] == {"role": "system", "content": "You are terse."}


def test_openai_and_sharegpt_conversations_are_the_same_conversation(tmp_path):
    openai, sharegpt = [], []
    for i in range(30):
        turns = [("system", "Answer with emoji."), ("user", f"Hi {i}"), ("assistant", f"Hello {i} 👋"),
                 ("user", f"Weather {i}?"), ("assistant", "Sunny ☀️")]
        openai.append({"messages": [{"role": role, "content": text} for role, text in turns]})
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        sharegpt.append({"conversations": [{"from": names[role], "value": text} for role, text in turns]})
    a = prepare(write_jsonl(tmp_path / "o.jsonl", openai), tmp_path / "o", data_format="messages", heldout_min=3)
    b = prepare(write_jsonl(tmp_path / "s.jsonl", sharegpt), tmp_path / "s", data_format="messages", heldout_min=3)
    assert a["train"] == b["train"] == 27
    first = read_jsonl(tmp_path / "o/train.jsonl")[0]["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant", "user", "assistant"]
    assert [r["messages"] for r in read_jsonl(tmp_path / "o/train.jsonl")] == \
        [r["messages"] for r in read_jsonl(tmp_path / "s/train.jsonl")]


def test_a_bad_record_in_a_json_list_is_named_by_its_number(tmp_path):
    from loragrid.fetch import fetch_dataset

    records = [{"question": r["question"], "answer_en": r["answer_en"]} for r in demo_records(40)]
    records.insert(4, {"question": "no answer here"})
    (tmp_path / "d.json").write_text(json.dumps(records), encoding="utf-8")
    fetch_dataset(f"local:{tmp_path / 'd.json'}", tmp_path / "dataset")
    with pytest.raises(LoragridError,
                       match=r"d\.json, record 5: none of the answer fields \['answer_en', 'answer_zh'\]"):
        prepare(tmp_path / "dataset" / "records.jsonl", tmp_path / "out", heldout_min=5)


def test_outputs_get_the_usual_file_mode_not_a_private_one(tmp_path):
    import torch
    from safetensors.torch import save_file

    from loragrid.common import atomic_dir, write_json

    write_json(tmp_path / "out.json", {"a": 1})
    with atomic_dir(tmp_path / "folder") as staging:
        (staging / "x").write_text("x")
        # safetensors writes its files private (0600), as save_pretrained's model.safetensors was.
        save_file({"w": torch.zeros(2)}, staging / "model.safetensors")
        (staging / "sub").mkdir(mode=0o700)
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~umask
    for name in ("x", "model.safetensors"):
        assert (tmp_path / "folder" / name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "folder" / "sub").stat().st_mode & 0o777 == 0o777 & ~umask


# --- records that are valid JSON but not text Python can write ---------------------------------------

GOOD_LINES = {
    "qa": [json.dumps(r, ensure_ascii=False) for r in demo_records(50)],
    "alpaca": [json.dumps({"instruction": f"Task {i}", "input": "", "output": f"Done {i}"}) for i in range(50)],
    "messages": [json.dumps({"messages": [{"role": "user", "content": f"Hi {i}"},
                                          {"role": "assistant", "content": f"Hello {i}"}]}) for i in range(50)],
}
DEEP = "[" * 100_000 + "]" * 100_000
# (case, format, a line that json.loads accepts or that breaks Python past it, what prepare says about it)
TWO_TURNS = '"content": "x"}, {"role": "assistant", "content": "y"}]}'
UNREADABLE_LINES = [
    ("surrogate in question", "qa", r'{"question": "caf\ud800", "answer_en": "x"}',
     r"field 'question' holds an unpaired surrogate \(\\ud800\), which is not valid Unicode"),
    ("surrogate in answer", "qa", r'{"question": "q?", "answer_en": "x\udfff"}',
     r"answer field 'answer_en' holds an unpaired surrogate \(\\udfff\)"),
    ("surrogate in system", "qa", r'{"question": "q?", "answer_en": "x", "system": "\ud800"}',
     r"field 'system' holds an unpaired surrogate"),
    ("surrogate in alpaca input", "alpaca", r'{"instruction": "Do", "input": "\udc00", "output": "ok"}',
     r"field 'input' holds an unpaired surrogate"),
    ("surrogate in a turn", "messages", r'{"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", '
     r'"content": "y"}]}', r"messages\[0\]: 'content' holds an unpaired surrogate \(\\ud800\)"),
    ("nesting too deep", "qa", '{"question": "q?", "answer_en": "x", "extra": ' + DEEP + "}",
     "arrays or objects nested too deeply to read"),
    ("integer too long", "qa", '{"question": "q?", "answer_en": ' + "9" * 5000 + "}",
     r"a number of 5000 digits, more than Python reads \(4300\); quote it if it is text"),
    ("integer too long as a role", "messages", '{"messages": [{"role": ' + "1" * 4400 + ", " + TWO_TURNS,
     "a number of 4400 digits"),
    ("NaN question", "qa", '{"question": NaN, "answer_en": "x"}', "field 'question' should be text, got NaN"),
    ("-Infinity answer", "qa", '{"question": "q?", "answer_en": -Infinity}',
     "answer field 'answer_en' should be text, got -Infinity"),
    ("Infinity input", "alpaca", '{"instruction": "Do", "input": 1e999, "output": "ok"}',
     "field 'input' should be text, got Infinity"),
    ("NUL in question", "qa", r'{"question": "q\u0000?", "answer_en": "x"}',
     r"field 'question' holds a NUL character \(\\u0000\), which is not text \(a binary or UTF-16 file\?\)"),
    ("number as role", "messages", '{"messages": [{"role": 7, ' + TWO_TURNS,
     r"messages\[0\]: 'role' should be text, got int"),
    ("null role", "messages", '{"messages": [{"role": null, ' + TWO_TURNS,
     r"messages\[0\]: missing 'role' \(OpenAI\) or 'from' \(sharegpt\)"),
    ("list as role", "messages",
     '{"conversations": [{"from": ["human"], "value": "x"}, {"from": "gpt", "value": "y"}]}',
     r"conversations\[0\]: 'from' should be text, got list"),
    ("huge unknown role", "messages", '{"messages": [{"role": "' + "r" * 10_000 + '", ' + TWO_TURNS,
     r"messages\[0\]: unknown role 'r{10,30}\.\.\.r*' \(expected one of"),
]


@pytest.mark.parametrize("case, data_format, bad_line, reason", UNREADABLE_LINES,
                         ids=[case[0] for case in UNREADABLE_LINES])
def test_json_that_python_cannot_take_is_a_bad_record(tmp_path, case, data_format, bad_line, reason):
    lines = list(GOOD_LINES[data_format])
    lines.insert(6, bad_line)
    source = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(LoragridError,
                       match=rf"^data/bad\.jsonl, line 7: {reason}.* \(set dataset\.on_bad_record: skip"):
        prepare(source, tmp_path / "out", data_format=data_format, heldout_min=5, display_name="data/bad.jsonl")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("data_format", sorted(GOOD_LINES))
def test_json_that_python_cannot_take_is_counted_when_skipping(tmp_path, data_format):
    cases = [(line, reason) for _, fmt, line, reason in UNREADABLE_LINES if fmt == data_format]
    lines = list(GOOD_LINES[data_format])
    for index, (bad_line, _) in enumerate(cases):
        lines.insert(3 + 2 * index, bad_line)
    summary = prepare(write_jsonl(tmp_path / "bad.jsonl", lines), tmp_path / "out", data_format=data_format,
                      heldout_min=5, on_bad_record="skip")
    assert summary["rejected_count"] == len(cases) and summary["records_valid"] == 50
    saved = read_json(tmp_path / "out/prepare.json")
    assert [r["line"] for r in saved["rejected"]] == [4 + 2 * i for i in range(len(cases))]
    for rejected, (_, reason) in zip(saved["rejected"], cases):
        assert re.match(reason, rejected["reason"]) and len(rejected["reason"]) < 300, rejected["reason"]
    assert len(read_jsonl(tmp_path / "out/train.jsonl")) == summary["train"]


# --- CSV files: text cells, physical lines -----------------------------------------------------------

def _fetched(tmp_path, name: str, content: str):
    from loragrid.fetch import fetch_dataset

    (tmp_path / name).write_text(content, encoding="utf-8", newline="")
    return fetch_dataset(f"local:{tmp_path / name}", tmp_path / "dataset")


def test_a_csv_record_is_named_by_the_line_it_starts_on(tmp_path):
    rows = "".join(f'Question {i}?,"Line one,\r\nline two {i} 😀"\r\n' for i in range(30))
    provenance = _fetched(tmp_path, "d.csv", "question,answer_en\r\n" + rows + "\r\nno answer?,\r\nLast?,ok\r\n")
    # 30 records of two lines each from line 2, a blank line 62, the bad record on line 63.
    assert provenance["parts"][0]["lines"][-3:] == [60, 63, 64]
    with pytest.raises(LoragridError, match=r"d\.csv, line 63: answer field 'answer_en' is empty"):
        prepare(tmp_path / "dataset/records.jsonl", tmp_path / "out", heldout_min=5)
    summary = prepare(tmp_path / "dataset/records.jsonl", tmp_path / "out", heldout_min=5, on_bad_record="skip")
    assert [(r["line"], r["reason"][:28]) for r in summary["rejected"]] == [(63, "answer field 'answer_en' is ")]
    rows = read_jsonl(tmp_path / "out/train.jsonl") + read_jsonl(tmp_path / "out/heldout.jsonl")
    by_question = {r["messages"][0]["content"]: r for r in rows}
    assert by_question["Question 3?"]["id"].endswith("d.csv, line 8")
    assert by_question["Question 3?"]["messages"][1]["content"] == "Line one,\r\nline two 3 😀"
    assert by_question["Last?"]["id"].endswith("d.csv, line 64")


def test_csv_cells_are_text_as_written(tmp_path):
    na_like = ["NA", "None", "null", "N/A", "nan", "NaN", "#N/A", "0"]
    rows = [f"{i},{i * 7}" for i in range(1, 31)] + [f"{100 + i},{text}" for i, text in enumerate(na_like)]
    _fetched(tmp_path, "d.csv", "question,answer_en\n" + "\n".join(rows) + "\n,empty question\n200,\n")
    summary = prepare(tmp_path / "dataset/records.jsonl", tmp_path / "out", heldout_min=5, on_bad_record="skip")
    assert summary["records_valid"] == 38
    assert [(r["line"], r["reason"]) for r in summary["rejected"]] == [
        (40, "field 'question' is empty"),
        (41, "answer field 'answer_en' is empty (an empty answer teaches the model to say nothing)")]
    pairs = {r["messages"][0]["content"]: r["messages"][1]["content"]
             for r in read_jsonl(tmp_path / "out/train.jsonl") + read_jsonl(tmp_path / "out/heldout.jsonl")}
    assert pairs["3"] == "21" and [pairs[str(100 + i)] for i in range(len(na_like))] == na_like


@pytest.mark.parametrize("content, message", [
    ('question,answer_en\nq1,a1\nq2,"never closed\nq3,a3\n',
     r"d\.csv, line 3: not valid CSV \(a quote opened in this record is never closed\)"),
    ("question,answer_en\nq1,a1\nq2,hello, world\n",
     r"d\.csv, line 3: 3 fields, but the header names 2 columns \(quote a field that holds a comma\)"),
    ('question,answer_en\nq1,"a\nb"\nq2,"x"y\n', r"d\.csv, line 4: not valid CSV \(',' expected after '\"'\)"),
    ("question,question\nq1,a1\n", r"d\.csv, line 1: the header names the column 'question' twice"),
], ids=["unclosed quote", "unquoted comma", "text after a closing quote", "a column named twice"])
def test_a_malformed_csv_names_the_line(tmp_path, content, message):
    with pytest.raises(LoragridError, match=message):
        _fetched(tmp_path, "d.csv", content)
    assert not (tmp_path / "dataset").exists()


def test_every_element_of_a_json_list_is_judged_on_its_own(tmp_path):
    records = [{"question": r["question"], "answer_en": r["answer_en"]} for r in demo_records(30)]
    records[3:3] = [5, {"question": "q?", "answer_en": 10**30}, {"question": "caf\ud800", "answer_en": "x"}]
    _fetched(tmp_path, "d.json", json.dumps(records))
    with pytest.raises(LoragridError, match=r"d\.json, record 4: expected a JSON object, got int"):
        prepare(tmp_path / "dataset/records.jsonl", tmp_path / "out", heldout_min=5)
    summary = prepare(tmp_path / "dataset/records.jsonl", tmp_path / "out", heldout_min=5, on_bad_record="skip")
    assert [(r["record"], r["reason"]) for r in summary["rejected"]] == [
        (4, "expected a JSON object, got int"), (5, "answer field 'answer_en' should be text, got int"),
        (6, r"field 'question' holds an unpaired surrogate (\ud800), which is not valid Unicode")]
    assert summary["records_valid"] == 30


def test_a_file_name_that_is_not_utf8(tmp_path):
    from loragrid.data import gather_records
    from loragrid.fetch import fetch_dataset

    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "good.jsonl", demo_records(10))
    try:
        (folder / os.fsdecode(b"caf\xe9.jsonl")).write_text("{}\n")
    except (OSError, UnicodeEncodeError):
        pytest.skip("the file system takes UTF-8 names only")
    with pytest.raises(LoragridError,
                       match=r"data/caf\\xe9\.jsonl: the file name is not valid UTF-8; rename the file"):
        gather_records(folder, "data", tmp_path / "records.jsonl", tmp_path)
    with pytest.raises(LoragridError, match=r"caf\\xe9\.jsonl: the file name is not valid UTF-8"):
        fetch_dataset(f"local:{folder}", tmp_path / "dataset")  # the source's checksum comes first


# --- questions that are twins ------------------------------------------------------------------------

def test_question_keys_fold_width_punctuation_and_spacing():
    from loragrid.data import _question_key

    def key(question):
        return _question_key([{"role": "user", "content": question}, {"role": "assistant", "content": "a"}])

    assert key("What is 2+2?") == key("what is 2 + 2 ？") == key("What is 2+2") == key("ＷＨＡＴ  is 2+2!")
    assert key("hello,world") == key("Hello, world.") == key("“hello” world")
    assert key("Sunny ☀️ today?") == key("sunny ☀ today")  # the emoji variation selector
    assert key("What does 🎉 mean?") != key("What does 😀 mean?")
    assert key("What is 3.5 squared?") != key("What is 35 squared?")


def test_question_twins_share_a_split_and_are_counted(tmp_path):
    twins = ["What is 2+2?", "what is 2 + 2 ？", "WHAT IS 2+2?", "What is 2+2"]
    records = demo_records(40) + [{"question": q, "answer_en": f"4 ({i})"} for i, q in enumerate(twins)]
    source = write_jsonl(tmp_path / "twins.jsonl", records)
    held_out = False
    for seed in range(12):
        summary = prepare(source, tmp_path / f"out{seed}", heldout_min=10, seed=seed)
        # "WHAT IS 2+2?" was the same question before (case); the other two are twins by the new key only.
        assert summary["distinct_questions"] == 41 and summary["question_twins_merged"] == 2
        splits = {name: {r["messages"][0]["content"] for r in read_jsonl(tmp_path / f"out{seed}/{name}")}
                  for name in ("train.jsonl", "heldout.jsonl")}
        assert set(twins) <= splits["train.jsonl"] or len(set(twins) & splits["heldout.jsonl"]) == 1
        assert not (set(twins) & splits["train.jsonl"] and set(twins) & splits["heldout.jsonl"])
        if set(twins) & splits["heldout.jsonl"]:
            held_out = True
            assert summary["heldout_repeats_dropped"] == 3
    assert held_out
    assert read_json(tmp_path / "out0/prepare.json")["question_twins_merged"] == 2


def test_data_without_twins_splits_as_the_case_and_spacing_key_did(qa_file, tmp_path):
    def old_split(records, seed, n_heldout):
        groups = {}
        for r in records:
            groups.setdefault(" ".join(r["question"].casefold().split()), []).append(r["question"])
        keys = sorted(groups)
        random.Random(seed).shuffle(keys)
        return [groups[k][0] for k in keys[:n_heldout]], [q for k in keys[n_heldout:] for q in groups[k]]

    records = demo_records(60)
    for seed in (1, 42):
        summary = prepare(qa_file, tmp_path / str(seed), heldout_min=10, seed=seed)
        assert summary.get("question_twins_merged", 0) == 0
        heldout, train = old_split(records, seed, summary["heldout"])
        assert [r["messages"][0]["content"] for r in read_jsonl(tmp_path / str(seed) / "heldout.jsonl")] == heldout
        assert [r["messages"][0]["content"] for r in read_jsonl(tmp_path / str(seed) / "train.jsonl")] == train


# --- a byte-order mark; null values ------------------------------------------------------------------

BOM = "\ufeff"


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path, name):
    records = [{"question": r["question"], "answer_en": r["answer_en"]} for r in demo_records(30)]
    records.insert(6, {"question": "no answer?"})
    text = "".join(json.dumps(r) + "\n" for r in records) if name == "d.jsonl" else json.dumps(records, indent=1)
    _fetched(tmp_path, name, BOM + text)
    unit = "line 7" if name == "d.jsonl" else "record 7"
    with pytest.raises(LoragridError, match=rf"{re.escape(name)}, {unit}: none of the answer fields"):
        prepare(tmp_path / "dataset/records.jsonl", tmp_path / "out", heldout_min=5)
    summary = prepare(tmp_path / "dataset/records.jsonl", tmp_path / "out", heldout_min=5, on_bad_record="skip")
    assert summary["records_valid"] == 30 and summary["rejected_count"] == 1  # line 1 is read, not skipped
    # prepare on the user's own JSONL file, without fetch_dataset, reads line 1 too.
    source = write_jsonl(tmp_path / "own.jsonl", [BOM + json.dumps(records[0])] + records[1:6] + records[7:])
    assert prepare(source, tmp_path / "own", heldout_min=5)["records_valid"] == 30


@pytest.mark.parametrize("name, content, message", [
    ("d.jsonl", '{"question": "q?", "answer_en": "x"}\n{"question": "q2?", \n',
     r"d\.jsonl, line 2: invalid JSON \(Expecting property name enclosed in double quotes at column 21\)"),
    ("d.jsonl", '{"question": x}\n', r"d\.jsonl, line 1: invalid JSON \(Expecting value at column 14\)"),
    # json's own message ends in "at" for some errors: said once ("starting at column", not "at at column").
    ("d.jsonl", '{"question": "q?\n', r"d\.jsonl, line 1: invalid JSON \(Unterminated string starting at column 14\)"),
    ("d.json", '[{"question": "q?}]', r"d\.json, line 1: invalid JSON \(Unterminated string starting at column 15\)"),
    ("d.json", '[{"question": "q?",\n "answer_en": x}]',
     r"d\.json, line 2: invalid JSON \(Expecting value at column 15\)"),
    ("d.json", '[{"question": x}]', r"d\.json, line 1: invalid JSON \(Expecting value at column 15\)"),
    ("d.json", '{"question": "q?"}', r"d\.json: expected a JSON list of records, got a dict"),
    ("d.jsonl", "", r"d\.jsonl: the file is empty"),
])
def test_a_byte_order_mark_keeps_the_other_messages(tmp_path, name, content, message):
    with pytest.raises(LoragridError, match=message):
        _fetched(tmp_path, name, BOM + content)
        prepare(tmp_path / "dataset/records.jsonl", tmp_path / "out", heldout_min=1)


@pytest.mark.parametrize("data_format, bad_line, reason", [
    ("qa", '{"question": null, "answer_en": "x"}', "field 'question' is null"),
    ("alpaca", '{"instruction": "Do", "output": null}', "field 'output' is null"),
    ("alpaca", '{"instruction": null, "output": "ok"}', "field 'instruction' is null"),
    ("qa", "null", "expected a JSON object, got null"),
    ("messages", '{"messages": [null, {"role": "assistant", "content": "y"}]}',
     r"messages\[0\] should be an object, got null"),
], ids=["null question", "null output", "null instruction", "null line", "null turn"])
def test_a_null_value_is_named_null_not_missing(tmp_path, data_format, bad_line, reason):
    lines = list(GOOD_LINES[data_format])
    lines.insert(5, bad_line)
    source = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(LoragridError, match=rf"^data/bad\.jsonl, line 6: {reason} \(set dataset\.on_bad_record"):
        prepare(source, tmp_path / "out", data_format=data_format, heldout_min=5, display_name="data/bad.jsonl")
    summary = prepare(source, tmp_path / "out", data_format=data_format, heldout_min=5, on_bad_record="skip")
    assert [(r["line"], re.fullmatch(reason, r["reason"]) is not None) for r in summary["rejected"]] == [(6, True)]


def test_a_null_record_in_a_json_list_is_named_null(tmp_path):
    records = [None] + [{"question": r["question"], "answer_en": r["answer_en"]} for r in demo_records(30)]
    _fetched(tmp_path, "d.json", json.dumps(records))
    with pytest.raises(LoragridError, match=r"d\.json, record 1: expected a JSON object, got null"):
        prepare(tmp_path / "dataset/records.jsonl", tmp_path / "out", heldout_min=5)


# --- text as written ---------------------------------------------------------------------------------

def test_a_text_of_several_lines_keeps_its_first_lines_indentation(tmp_path):
    code = "    if a:\n        c()"  # stripped whole, its first line would be a Python syntax error
    records = [{"instruction": f"Indent {i}", "output": f"\n  \n{code}  \n\n"} for i in range(30)]
    records += [{"instruction": "  Capital of France?\t", "input": " france ", "output": " Paris\n"},
                {"instruction": "Blank", "output": " \n\t\n "}]
    summary = prepare(write_jsonl(tmp_path / "a.jsonl", records), tmp_path / "out", data_format="alpaca",
                      heldout_min=3, on_bad_record="skip")
    assert summary["rejected_count"] == 1  # whitespace over several lines is still empty
    rows = {r["messages"][0]["content"]: r["messages"] for r in read_jsonl(tmp_path / "out/train.jsonl")
            + read_jsonl(tmp_path / "out/heldout.jsonl")}
    assert {rows[f"Indent {i}"][1]["content"] for i in range(30)} == {code}
    compile("def f(a):\n" + rows["Indent 0"][1]["content"], "output", "exec")  # a body Python takes
    assert rows["Capital of France?"] == [{"role": "user", "content": "Capital of France?", "input": "france"},
                                          {"role": "assistant", "content": "Paris"}]


def test_a_conversation_turn_of_code_keeps_its_indentation(tmp_path):
    turns = [{"messages": [{"role": "user", "content": f" Fix {i} "},
                           {"role": "assistant", "content": "\n    return 1\nend\n"}]} for i in range(30)]
    prepare(write_jsonl(tmp_path / "m.jsonl", turns), tmp_path / "out", data_format="messages", heldout_min=3)
    first = read_jsonl(tmp_path / "out/train.jsonl")[0]["messages"]
    assert first[0]["content"].startswith("Fix ") and first[1]["content"] == "    return 1\nend"


# --- questions that differ by a symbol, or by spaces in CJK -------------------------------------------

def _key(question):
    from loragrid.data import _question_key
    return _question_key([{"role": "user", "content": question}, {"role": "assistant", "content": "a"}])


def test_punctuation_that_is_part_of_a_word_makes_another_question():
    assert _key("What is C#?") != _key("What is C?") != _key("What is C++?")
    assert _key("What is C#?") == _key("what is c#") == _key("WHAT IS C# ?!")
    assert _key("Is it 100%?") != _key("Is it 100?")
    assert _key("Why don't cats swim?") != _key("Why don t cats swim?")
    assert _key("Why don't cats swim?") == _key("Why don’t cats swim")
    assert _key("What is node.js?") != _key("What is node js?")
    assert _key("First, what is it?") == _key("First what is it.") == _key("(First) what is it…")


def test_questions_of_punctuation_alone_stay_apart():
    assert len({_key("?"), _key("..."), _key("!!"), _key("?!")}) == 4 and _key("?") == _key(" ? ")


def test_spaces_between_cjk_characters_make_no_other_question():
    assert _key("瑞利散射是什么") == _key("瑞利 散射 是什么？") == _key("瑞利散射，是什么?")
    assert _key("これは何ですか") == _key("これは 何 ですか")
    assert _key("하늘은 왜 파랄까") == _key("하늘은왜파랄까")
    assert _key("Why is it 蓝色") != _key("Whyisit蓝色")  # Latin words keep their spaces


def test_different_questions_keep_their_records_and_cjk_twins_share_a_split(tmp_path):
    apart = ["What is C#?", "What is C?", "What is C++?"]
    twins = ["瑞利散射是什么", "瑞利 散射 是什么", "瑞利散射 是什么？"]
    records = demo_records(40) + [{"question": q, "answer_en": q[::-1]} for q in apart + twins]
    source = write_jsonl(tmp_path / "q.jsonl", records)
    held = set()
    for seed in range(12):
        summary = prepare(source, tmp_path / f"out{seed}", heldout_min=10, seed=seed)
        assert summary["distinct_questions"] == 40 + 3 + 1
        splits = {name: [r["messages"][0]["content"] for r in read_jsonl(tmp_path / f"out{seed}/{name}")]
                  for name in ("train.jsonl", "heldout.jsonl")}
        every = splits["train.jsonl"] + splits["heldout.jsonl"]
        assert all(every.count(q) == 1 for q in apart)  # none dropped as the repeat of another
        assert not (set(twins) & set(splits["train.jsonl"]) and set(twins) & set(splits["heldout.jsonl"]))
        held |= (set(apart) | set(twins)) & set(splits["heldout.jsonl"])
    assert set(apart) <= held and held & set(twins)  # the seeds did put these questions in held-out
