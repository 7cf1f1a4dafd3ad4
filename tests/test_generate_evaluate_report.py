import logging
import re
import shutil

import pandas as pd
import pytest

from conftest import TINY_RUN, write_jsonl
from loragrid.common import LoragridError, read_json, read_jsonl
from loragrid.evaluate import emoji_metrics, evaluate_to_file
from loragrid.generate import generate
from loragrid.report import write_report
from loragrid.train import train_to_files
from test_report_unit import MARKUP_ANSWER, MARKUP_CELL

GENERATE = {"max_new_tokens": 6, "batch_size": 4, "do_sample": False, "temperature": 0.7, "top_p": 0.9,
            "repetition_penalty": 1.0, "seed": 0}


@pytest.fixture(scope="module")
def generated(tiny_model_dir, prepared_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("generated")
    meta = generate(tiny_model_dir, prepared_dir / "heldout.jsonl", folder / "base.jsonl", folder / "base.json",
                    "chat", GENERATE)
    return folder, meta


def test_generate_answers_every_heldout_question_in_order(generated, prepared_dir):
    folder, meta = generated
    answers = read_jsonl(folder / "base.jsonl")
    heldout = read_jsonl(prepared_dir / "heldout.jsonl")
    assert [a["id"] for a in answers] == [r["id"] for r in heldout]
    assert all(a["question"] == r["messages"][0]["content"] for a, r in zip(answers, heldout))
    assert all(0 <= a["new_tokens"] <= 6 for a in answers)
    assert meta["questions"] == len(heldout) and meta["tokens_per_second"] > 0


def test_a_question_is_shown_with_its_input(tiny_model_dir, tmp_path):
    """An alpaca record's input is part of what the model was asked: the generations (and so the report's
    samples) show it after the instruction, as templates without an Input section put it in the prompt."""
    from loragrid.data import prepare

    records = [{"instruction": f"Translate sentence {i}.", "input": f"Bonjour {i}", "output": f"Hello {i}"}
               for i in range(12)]
    prepare(write_jsonl(tmp_path / "alpaca.jsonl", records), tmp_path / "data", data_format="alpaca", heldout_min=2)
    generate(tiny_model_dir, tmp_path / "data/heldout.jsonl", tmp_path / "a.jsonl", tmp_path / "a.json", "alpaca",
             {**GENERATE, "max_new_tokens": 1})
    questions = [a["question"] for a in read_jsonl(tmp_path / "a.jsonl")]
    shown = re.compile(r"Translate sentence (\d+)\.\n\nBonjour \1")
    assert questions and all(shown.fullmatch(question) for question in questions), questions


def test_batching_does_not_change_greedy_answers(generated, tiny_model_dir, prepared_dir, tmp_path):
    folder, _ = generated
    generate(tiny_model_dir, prepared_dir / "heldout.jsonl", tmp_path / "one.jsonl", tmp_path / "one.json",
             "chat", {**GENERATE, "batch_size": 1})
    batched = [a["new_tokens"] for a in read_jsonl(folder / "base.jsonl")]
    single = [a["new_tokens"] for a in read_jsonl(tmp_path / "one.jsonl")]
    assert batched == single


def test_emoji_metrics():
    metrics = emoji_metrics(["Sunny today ☀️🌈", "no emoji here", "天气很好😀"])
    assert metrics["emoji_share"] == pytest.approx(2 / 3)
    assert metrics["emoji_per_answer"] == pytest.approx(1.0)


def test_evaluate(generated, tiny_model_dir, prepared_dir, tmp_path):
    folder, _ = generated
    result = evaluate_to_file(tmp_path / "eval.json", model_dir=tiny_model_dir,
                              heldout_path=prepared_dir / "heldout.jsonl", generations_path=folder / "base.jsonl",
                              generation_meta_path=folder / "base.json", template="chat", batch_size=3)
    assert read_json(tmp_path / "eval.json") == result
    # A random model over a ~600-token vocabulary: loss near log(600).
    assert 5.0 < result["heldout_loss"] < 8.0
    assert result["heldout_perplexity"] == pytest.approx(2.718281828 ** result["heldout_loss"], rel=1e-6)
    assert 0 <= result["chrf"] <= 100
    assert result["reference_emoji_share"] == 1.0
    # Batch size must not change the loss (padding is masked out).
    again = evaluate_to_file(tmp_path / "again.json", model_dir=tiny_model_dir,
                             heldout_path=prepared_dir / "heldout.jsonl", generations_path=folder / "base.jsonl",
                             generation_meta_path=folder / "base.json", template="chat", batch_size=1)
    assert again["heldout_loss"] == pytest.approx(result["heldout_loss"], rel=1e-4)


def _heldout_split(folder, prepared_dir, records):
    """A held-out split beside the prepared one's prepare.json (no manifest: these tests write it by hand)."""
    folder.mkdir()
    shutil.copy(prepared_dir / "prepare.json", folder / "prepare.json")
    return write_jsonl(folder / "heldout.jsonl", records)


# About 2400 tokens of question: its answer starts beyond evaluate's cutoff of 2048.
LONG_QUESTION = {"id": "h.jsonl, line 9", "messages": [{"role": "user", "content": "Why? " * 800},
                                                      {"role": "assistant", "content": "Because"}]}


def test_evaluate_names_and_counts_records_left_out_of_the_loss(generated, tiny_model_dir, prepared_dir, tmp_path,
                                                                caplog):
    folder, _ = generated
    records = read_jsonl(prepared_dir / "heldout.jsonl")
    runs = {}
    for name, split in (("all", [*records, LONG_QUESTION]), ("normal", records)):
        heldout = _heldout_split(tmp_path / name, prepared_dir, split)
        with caplog.at_level(logging.WARNING, logger="loragrid.evaluate"):
            runs[name] = evaluate_to_file(tmp_path / f"{name}.json", model_dir=tiny_model_dir, heldout_path=heldout,
                                          generations_path=folder / "base.jsonl",
                                          generation_meta_path=folder / "base.json", template="chat")
    assert runs["all"]["questions"] == len(records) + 1 and runs["all"]["heldout_scored"] == len(records)
    assert runs["normal"]["heldout_scored"] == runs["normal"]["questions"] == len(records)
    assert runs["all"]["heldout_loss"] == pytest.approx(runs["normal"]["heldout_loss"], rel=1e-6)
    assert f"leaves out 1 of {len(records) + 1} records" in caplog.text and "h.jsonl, line 9" in caplog.text


def test_evaluate_fails_before_loading_the_model_when_no_answer_fits(generated, tiny_model_dir, prepared_dir,
                                                                     tmp_path, monkeypatch):
    from loragrid import modeling

    folder, _ = generated
    heldout = _heldout_split(tmp_path / "split", prepared_dir,
                             [LONG_QUESTION, {**LONG_QUESTION, "id": "h.jsonl, line 10"}])
    monkeypatch.setattr(modeling, "load_for_inference", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    message = r": none of its 2 records has an answer within the first 2048 tokens \(evaluate's cutoff\), so there"
    with pytest.raises(LoragridError, match=re.escape(str(heldout)) + message):
        evaluate_to_file(tmp_path / "eval.json", model_dir=tiny_model_dir, heldout_path=heldout,
                         generations_path=folder / "base.jsonl", generation_meta_path=folder / "base.json",
                         template="chat")
    assert not (tmp_path / "eval.json").exists()


def test_generate_without_a_chat_template_fails_before_loading_the_model(tiny_model_dir, prepared_dir, tmp_path,
                                                                          monkeypatch):
    from loragrid import modeling

    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model_dir / "chat_template.jinja").unlink()
    monkeypatch.setattr(modeling, "load_for_inference", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    with pytest.raises(LoragridError, match="the model has no chat template; choose another template"):
        generate(model_dir, prepared_dir / "heldout.jsonl", tmp_path / "g.jsonl", tmp_path / "g.json", "chat",
                 {"max_new_tokens": 4, "batch_size": 8, "do_sample": False, "num_beams": 1, "temperature": 0.7,
                  "top_p": 0.9, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "seed": 0})
    assert not (tmp_path / "g.jsonl").exists()


def test_report(generated, tiny_model_dir, prepared_dir, tmp_path):
    folder, _ = generated
    base_eval = evaluate_to_file(tmp_path / "base.json", model_dir=tiny_model_dir,
                                 heldout_path=prepared_dir / "heldout.jsonl", generations_path=folder / "base.jsonl",
                                 generation_meta_path=folder / "base.json", template="chat")
    run_files = {}
    for method in ("lora", "qlora4"):
        train_to_files(tiny_model_dir, prepared_dir, tmp_path / method, tmp_path / f"{method}.train.json",
                       {**TINY_RUN, "method": method}, "chat")
        run_files[method] = {"train": tmp_path / f"{method}.train.json", "eval": tmp_path / "base.json",
                             "generations": folder / "base.jsonl"}
    # lora's first answer holds Markdown markup; report.md's table shows it as written.
    answers = read_jsonl(folder / "base.jsonl")
    write_jsonl(tmp_path / "lora.jsonl", [{**answers[0], "answer": MARKUP_ANSWER}, *answers[1:]])
    run_files["lora"]["generations"] = tmp_path / "lora.jsonl"
    out = tmp_path / "report"
    table = write_report(run_files, {"eval": tmp_path / "base.json", "generations": folder / "base.jsonl"},
                         table_csv=out / "summary.csv", table_html=out / "summary.html", markdown=out / "report.md",
                         loss_plot=out / "loss.png", memory_plot=out / "memory.png",
                         quality_plot=out / "quality.png", samples_page=out / "samples.html",
                         runs_dir=out / "runs", sample_count=2)
    assert list(table["run"]) == ["base", "lora", "qlora4"]
    csv = pd.read_csv(out / "summary.csv")
    assert csv.loc[csv["run"] == "qlora4", "weights_gb"].item() < csv.loc[csv["run"] == "lora", "weights_gb"].item()
    assert csv.loc[0, "heldout_loss"] == pytest.approx(base_eval["heldout_loss"])
    lora_train = read_json(tmp_path / "lora.train.json")
    assert csv.loc[csv["run"] == "lora", "estimated_memory_gb"].item() == pytest.approx(
        lora_train["memory_estimate"]["at_measured_step"]["total_bytes"] / 1e9)
    assert "estimated (GB)" in (out / "report.md").read_text()
    markdown = (out / "report.md").read_text()
    assert "| run " in markdown and "qlora4" in markdown and "training memory (GB)" in markdown
    assert "## Provenance" in markdown and "settings sha256" in markdown
    first_question = read_jsonl(folder / "base.jsonl")[0]["question"]
    assert markdown.count("| model | answer |") == 2 and first_question in markdown
    assert f"\n| lora | {MARKUP_CELL} |\n" in markdown
    assert "<th>training memory (GB)</th>" in (out / "summary.html").read_text()
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["lora.html", "qlora4.html"]
    for png in ("loss.png", "memory.png", "quality.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_provenance_hash_follows_the_settings(tmp_path):
    from loragrid.common import provenance

    split = tmp_path / "split.jsonl"
    split.write_text('{"a": 1}\n')
    first = provenance({"lr": 1, "r": 2}, {"train_split": split})
    assert first["settings_sha256"] == provenance({"r": 2, "lr": 1}, {"train_split": split})["settings_sha256"]
    assert first["settings_sha256"] != provenance({"lr": 2, "r": 2}, {"train_split": split})["settings_sha256"]
    split.write_text('{"a": 2}\n')
    assert provenance({"lr": 1, "r": 2}, {"train_split": split})["input_sha256"] != first["input_sha256"]
    assert first["workflow_commit"] is None or len(first["workflow_commit"]) >= 40
