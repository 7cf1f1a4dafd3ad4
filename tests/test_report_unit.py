"""The report's pieces that need no model: the Pareto front and the side-by-side samples."""

from loragrid.report import _where_trained, pareto_front, sample_answers, samples_html, samples_markdown


def test_pareto_front_lower_is_better():
    memory = [4.0, 1.0, 2.0, 3.0, 2.5]
    loss = [1.0, 3.0, 2.0, 2.5, 1.5]
    # run 3 (3.0 GB, 2.5) is beaten by run 2 (2.0 GB, 2.0) on both counts
    assert pareto_front(memory, loss, higher_is_better=False) == [1, 2, 4, 0]


def test_a_run_without_a_figure_is_on_no_pareto_front():
    """NaN memory (a run resumed after its last step) compared as equal to everything: it 'dominated' both runs."""
    nan = float("nan")
    assert pareto_front([nan, 2.0, 1.0], [0.5, 0.6, 0.7], higher_is_better=False) == [2, 1]
    assert pareto_front([nan, 2.0, 1.0], [0.5, 0.6, 0.7], higher_is_better=True) == [2]
    assert pareto_front([3.0, 2.0], [0.5, nan], higher_is_better=False) == [0]


def test_the_report_names_every_device_its_runs_trained_on():
    def trained_on(device):
        return {"train": {"device": device, "compute_dtype": "bfloat16"}}

    assert _where_trained({"full": trained_on("cpu"), "lora": trained_on("cpu")}) == "2 runs on cpu (bfloat16 compute)"
    mixed = {"full": trained_on("cuda"), "lora": trained_on("cpu"), "qlora4": trained_on("cuda")}
    assert _where_trained(mixed) == "3 runs: 2 on cuda (bfloat16 compute), 1 on cpu (bfloat16 compute)"


def test_pareto_front_higher_is_better_and_ties():
    memory = [1.0, 1.0, 2.0, 3.0]
    share = [0.2, 0.5, 0.5, 0.9]
    assert pareto_front(memory, share, higher_is_better=True) == [1, 3]


def test_samples_side_by_side_follow_the_question_ids():
    generations = {
        "base": [{"id": "a", "question": "Q1 | pipe", "reference": "R1", "answer": "base 1"},
                 {"id": "b", "question": "Q2", "reference": "R2", "answer": "base <2>"}],
        "lora": [{"id": "b", "question": "Q2", "reference": "R2", "answer": "lora 2"},
                 {"id": "a", "question": "Q1 | pipe", "reference": "R1", "answer": "lora 1\nline"}],
    }
    samples = sample_answers(generations, 2)
    assert samples[0]["answers"] == {"base": "base 1", "lora": "lora 1\nline"}
    markdown = "\n".join(samples_markdown(samples))
    assert "**1. Q1 \\| pipe**" in markdown and "| lora | lora 1<br>line |" in markdown
    page = samples_html(samples)
    assert "base &lt;2&gt;" in page and "<th>lora</th>" in page


def test_markdown_cells_show_markup_as_written():
    """An answer's HTML must not hide text, run or format in report.md, nor a backtick swallow the table."""
    from loragrid.report import _markdown_cell

    answer = "<!-- hidden --> <script>x()</script> <b>2</b> <details>\n```py\na | b \\| c"
    cell = _markdown_cell(answer)
    assert cell == ("&lt;!-- hidden --&gt; &lt;script&gt;x()&lt;/script&gt; &lt;b&gt;2&lt;/b&gt; &lt;details&gt;<br>"
                    "\\`\\`\\`py<br>a \\| b \\\\\\| c")
    assert "\n" not in cell and "<" not in cell.replace("<br>", "")
    assert _markdown_cell("1 & 2\r\n3") == "1 &amp; 2<br>3"


# An answer as a model writes it, and the cell that shows it as written where report.md is rendered.
MARKUP_ANSWER = "*bold* _x_ [text](http://u) ~~gone~~ $5 `c`\n# not a heading | 2"
MARKUP_CELL = r"\*bold\* \_x\_ \[text\](http://u) \~\~gone\~\~ \$5 \`c\`<br># not a heading \| 2"


def test_markdown_cells_show_emphasis_links_and_math_as_written():
    """*bold*, _x_, [text](url), ~~x~~ and $x$ rendered as emphasis, a link, strikethrough and (on GitHub) math."""
    from loragrid.report import _markdown_cell

    assert _markdown_cell(MARKUP_ANSWER) == MARKUP_CELL
    # Each escape is one backslash before the character, the answer's own backslash included.
    assert _markdown_cell(r"a\*b") == r"a\\\*b"


def _run(method: str, loss: float) -> dict:
    train = {"method": method, "gradient_checkpointing": False, "memory_estimate": None,
             "memory": {"training_peak_bytes": 2e9, "breakdown": {"weights": 2e9}, "peak_rss_bytes": 3e9},
             "parameters": {"trainable": 10, "trainable_percent": 1.0}, "train_runtime_seconds": 60,
             "tokens_per_second": 100.0, "provenance": {"settings_sha256": "0" * 64}}
    return {"train": train, "eval": {"heldout_loss": loss, "emoji_share": 0.5, "chrf": 30.0,
                                     "generation_tokens_per_second": 10.0}}


def _comparison(methods: dict[str, str], bench: bool = False):
    from loragrid.report import comparison_tables, summary_table, with_benchmarks

    runs = {name: _run(method, 1.0 + i) for i, (name, method) in enumerate(methods.items())}
    base = _run("none", 4.0)["eval"]
    scores = {name: {"tasks": {"arc": {"headline": "acc", "acc": 0.3}}} for name in ["base", *methods]}
    table = with_benchmarks(summary_table(runs, base), scores if bench else {})
    tables, notes = comparison_tables(table, runs, scores if bench else {}, [])
    return table, dict(tables)["Memory comparison"], notes


def test_without_a_full_run_the_relative_columns_are_left_out_and_the_note_says_so():
    for bench in (False, True):
        _, memory, notes = _comparison({"lora": "lora", "qlora4": "qlora4"}, bench)
        assert not [column for column in memory.columns if "% of full" in column]
        assert "No full fine-tuning run in this grid" in notes[1]
        assert not any("full fine-tuning run's" in note or "divides" in note for note in notes)


def test_the_note_names_the_reference_of_the_relative_columns():
    table, memory, notes = _comparison({"lora": "lora", "full-a": "full", "full-b": "full"}, bench=True)
    assert table.loc[table["run"] == "full-a", "loss_vs_full_percent"].item() == 100
    assert {"held-out loss, % of full", "arc acc, % of full"} <= set(memory.columns)
    assert "full-a, the first of the grid's 2 full fine-tuning runs (full-a, full-b)" in notes[1]
    _, _, notes = _comparison({"lora": "lora", "full": "full"})
    assert notes[1].endswith("by those of the full fine-tuning run full.")


def test_a_resumed_run_is_named_where_its_train_time_is_the_last_attempts():
    from loragrid.report import comparison_tables, summary_table

    runs = {"full": _run("full", 1.0), "lora": _run("lora", 2.0)}
    runs["lora"]["train"]["resumed_from_step"] = 28
    _, notes = comparison_tables(summary_table(runs, _run("none", 4.0)["eval"]), runs, {}, [])
    assert "Resumed from a checkpoint: lora at step 28; train time and tokens/s are the last attempt's." in notes
    runs["lora"]["train"]["resumed_from_step"] = 0
    _, notes = comparison_tables(summary_table(runs, _run("none", 4.0)["eval"]), runs, {}, [])
    assert not any(note.startswith("Resumed") for note in notes)


def test_the_index_lists_the_runs_its_linked_report_shows(tmp_path):
    """A later job of part of a grid (one run trained) rewrites the index: it lists the report's runs, not the
    config's, and counts the configured runs the report does not show."""
    from loragrid.report import write_index

    (tmp_path / "a/report").mkdir(parents=True)
    (tmp_path / "a/report/summary.csv").write_text("run,method\nbase,none\nlora,lora\n1,lora\n")
    (tmp_path / "a/report/report.md").write_text("# report\n")
    write_index(tmp_path, "a", {"model": "m", "dataset": "d", "runs": ["lora", "1", "qlora8", "lora-r64"]})
    write_index(tmp_path, "b", {"model": "m", "dataset": "d", "runs": ["lora"]})
    index = (tmp_path / "index.md").read_text()
    assert ("| a | `m` | `d` | 2: lora, 1 (not in the report: qlora8, lora-r64) | [report.md](a/report/report.md) |"
            in index)
    assert "| b | `m` | `d` | none in a report yet (1 configured: lora) | – |" in index
