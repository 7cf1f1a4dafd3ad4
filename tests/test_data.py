import os
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
    pd.DataFrame(records[20:40] + [{"question": "empty answer?", "answer_en": ""}]).to_csv(folder / "b.csv", index=False)
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


def test_alpaca_records_keep_their_input_and_ignore_an_empty_one(tmp_path):
    records = [{"instruction": f"Translate {i}", "input": f"word {i}" if i % 2 else "", "output": f"mot {i}"}
               for i in range(30)]
    records.append({"instruction": "Summarise", "output": "ok", "system": "You are terse."})
    prepare(write_jsonl(tmp_path / "a.jsonl", records), tmp_path / "out", data_format="alpaca", heldout_min=3)
    rows = {r["messages"][-2]["content"]: r["messages"] for r in read_jsonl(tmp_path / "out/train.jsonl")
            + read_jsonl(tmp_path / "out/heldout.jsonl")}
    assert rows["Translate 1"] == [{"role": "user", "content": "Translate 1", "input": "word 1"},
                                   {"role": "assistant", "content": "mot 1"}]
    assert rows["Translate 2"] == [{"role": "user", "content": "Translate 2"}, {"role": "assistant", "content": "mot 2"}]
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
    with pytest.raises(LoragridError, match=r"d\.json, record 5: answer field 'answer_en' is empty"):
        prepare(tmp_path / "dataset" / "records.jsonl", tmp_path / "out", heldout_min=5)


def test_outputs_get_the_usual_file_mode_not_a_private_one(tmp_path):
    from loragrid.common import atomic_dir, write_json

    import torch
    from safetensors.torch import save_file

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
