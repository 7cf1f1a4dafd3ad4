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
