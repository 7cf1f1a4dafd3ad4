"""The report's pieces that need no model: the Pareto front and the side-by-side samples."""

from loragrid.report import pareto_front, sample_answers, samples_html, samples_markdown


def test_pareto_front_lower_is_better():
    memory = [4.0, 1.0, 2.0, 3.0, 2.5]
    loss = [1.0, 3.0, 2.0, 2.5, 1.5]
    # run 3 (3.0 GB, 2.5) is beaten by run 2 (2.0 GB, 2.0) on both counts
    assert pareto_front(memory, loss, higher_is_better=False) == [1, 2, 4, 0]


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
