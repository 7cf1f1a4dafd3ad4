"""The report's plots, drawn from made-up tables: what each figure says, read off the matplotlib figure."""

import math

import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from loragrid import report

GREEN, RED = to_rgba("tab:green"), to_rgba("tab:red")


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions would save, kept open for inspection instead."""
    drawn = []
    monkeypatch.setattr(report, "_save_png", lambda figure, path: drawn.append(figure))
    yield drawn
    for figure in drawn:
        report._pyplot().close(figure)


def texts(figure) -> list[str]:
    found = [text.get_text() for text in figure.texts]
    for axis in figure.axes:
        found += [axis.get_title(), *(text.get_text() for text in axis.texts)]
    return found


def bench_table(runs: dict[str, dict], base: dict) -> pd.DataFrame:
    return pd.DataFrame([{"run": "base", **base}, *({"run": name, **values} for name, values in runs.items())])


def test_benchmark_plot_knows_which_metrics_are_lower_is_better(figures):
    """exact_match of a generate_until task is a score like acc: a gain is green, not a perplexity's red."""
    table = bench_table({"better": {"bench.gsm.exact_match": 0.5, "bench.wiki.word_perplexity": 20.0,
                                    "bench.bleu.bleu": 30.0},
                         "worse": {"bench.gsm.exact_match": 0.1, "bench.wiki.word_perplexity": 40.0,
                                   "bench.bleu.bleu": 10.0}},
                        {"bench.gsm.exact_match": 0.3, "bench.wiki.word_perplexity": 30.0, "bench.bleu.bleu": 20.0})
    report.plot_benchmark_changes(table, "unused.png")
    axes = {axis.get_title().split()[0]: axis for axis in figures[0].axes}
    for task in ("gsm", "wiki", "bleu"):
        assert [bar.get_facecolor() for bar in axes[task].patches] == [GREEN, RED], task
    assert axes["gsm"].get_ylabel() == "points against base (higher is better)"
    assert [round(bar.get_height()) for bar in axes["gsm"].patches] == [20, -20]
    assert axes["wiki"].get_ylabel() == "% change against base (lower is better)"
    assert axes["bleu"].get_ylabel() == "% change against base (higher is better)"
    assert report.lower_is_better("bench.lambada.bits_per_byte")
    assert report.lower_is_better("bench.pile.byte_perplexity.vs_full_percent")
    assert not report.lower_is_better("bench.arc.acc_norm")


def test_benchmark_plot_widens_with_its_runs_and_slants_long_names(figures):
    def plot(names):
        report.plot_benchmark_changes(bench_table({name: {"bench.arc.acc": 0.3} for name in names},
                                                  {"bench.arc.acc": 0.25}), "unused.png")
        return figures[-1]

    few = plot(["full", "lora"])
    many = plot([f"qlora4-r{rank}-lr1e-4" for rank in (4, 8, 16, 32, 64, 128, 256, 512)])
    assert many.get_figwidth() > few.get_figwidth() + 1
    assert {label.get_rotation() for label in few.axes[0].get_xticklabels()} == {0}
    assert {label.get_rotation() for label in many.axes[0].get_xticklabels()} == {30}
    # Slanted labels stay apart where the gap between neighbours, across the slant, exceeds a line of text.
    axis = many.axes[0]
    spacing = axis.transData.transform((1, 0))[0] - axis.transData.transform((0, 0))[0]
    line_height = axis.get_xticklabels()[0].get_fontsize() * many.dpi / 72
    assert spacing * math.sin(math.radians(30)) > 1.5 * line_height


def train(breakdown: dict | None) -> dict:
    return {"memory": {} if breakdown is None else {"breakdown": breakdown}, "memory_estimate": None}


def test_memory_plot_says_which_run_was_not_measured(figures):
    """A run resumed after its last checkpoint has no measurement: its bar is empty, and says why, not '0'."""
    report.plot_memory({"lora": train({"weights": 2e9, "gradients": 1e9}), "resumed": train(None)}, "unused.png")
    labels = figures[0].axes[0].texts
    assert [label.get_text() for label in labels] == ["3", "not measured", "no estimate", "no estimate"]


def test_quality_plot_names_the_runs_it_leaves_out(figures):
    nan = float("nan")
    table = pd.DataFrame({"run": ["base", "full", "resumed", "lora"], "training_memory_gb": [nan, 3.0, nan, 1.0],
                          "heldout_loss": [2.0, 1.0, 1.1, nan], "emoji_share": [0.1, 0.5, 0.6, 0.4]})
    report.plot_quality_vs_memory(table, "unused.png")
    loss, emoji = figures[0].axes
    assert loss.get_title() == "left out: resumed (memory not measured), lora (no held-out loss)"
    assert emoji.get_title() == "left out: resumed (memory not measured)"
    annotated = [text.get_text() for text in loss.texts]
    assert annotated == ["full"] and all(not math.isnan(text.xy[0]) for text in loss.texts)
