"""report: the comparison table (CSV and Markdown) and plots of every run against the base model."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from .common import atomic_file, read_json

log = logging.getLogger("loragrid.report")

COLUMNS = {
    "run": "run",
    "method": "method",
    "peak_memory_gb": "peak memory (GB)",
    "weights_memory_gb": "weights memory (GB)",
    "trainable_params": "trainable params",
    "trainable_percent": "trainable %",
    "heldout_loss": "held-out loss",
    "emoji_share": "emoji share",
    "chrf": "chrF",
    "train_minutes": "train time (min)",
    "train_tokens_per_second": "train tok/s",
    "generation_tokens_per_second": "gen tok/s",
    "settings_sha256": "settings sha256",
}


def summary_table(runs: dict[str, dict], base_eval: dict) -> pd.DataFrame:
    """One row per run plus the untuned base model; `runs` maps a name to {'train': ..., 'eval': ...}."""
    rows = [{"run": "base", "method": "none (untuned)", **_quality(base_eval)}]
    for name, files in runs.items():
        train = files["train"]
        rows.append({
            "run": name,
            "method": train["method"],
            "peak_memory_gb": train["memory"]["peak_rss_bytes"] / 1e9,
            "weights_memory_gb": train["memory"]["weights_bytes"] / 1e9,
            "trainable_params": train["parameters"]["trainable"],
            "trainable_percent": train["parameters"]["trainable_percent"],
            "train_minutes": train["train_runtime_seconds"] / 60,
            "train_tokens_per_second": train["tokens_per_second"],
            "settings_sha256": train["provenance"]["settings_sha256"],
            **_quality(files["eval"]),
        })
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _quality(evaluation: dict) -> dict:
    keys = ("heldout_loss", "emoji_share", "chrf", "generation_tokens_per_second")
    return {key: evaluation[key] for key in keys}


def _markdown_table(table: pd.DataFrame) -> str:
    formats = {
        "peak_memory_gb": "{:.2f}", "weights_memory_gb": "{:.3f}", "trainable_params": "{:,.0f}",
        "trainable_percent": "{:.2f}", "heldout_loss": "{:.3f}", "emoji_share": "{:.2f}", "chrf": "{:.1f}",
        "train_minutes": "{:.1f}", "train_tokens_per_second": "{:.0f}", "generation_tokens_per_second": "{:.0f}",
    }
    shown = table.drop(columns=["settings_sha256"])  # listed under Provenance instead
    for column, fmt in formats.items():
        shown[column] = [("–" if pd.isna(v) else fmt.format(v)) for v in table[column]]
    return shown.rename(columns=COLUMNS).to_markdown(index=False, disable_numparse=True)


def plot_loss_curves(runs: dict[str, dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    for name, files in runs.items():
        curve = files["train"]["loss_curve"]
        steps = [point["step"] for point in curve]
        losses = pd.Series([point["loss"] for point in curve]).rolling(5, min_periods=1).mean()
        axis.plot(steps, losses, label=name)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (rolling mean of 5)")
    axis.set_title("Training loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png")
    plt.close(figure)


def plot_memory_quality(table: pd.DataFrame, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = table[table["run"] != "base"]
    base = table[table["run"] == "base"].iloc[0]
    figure, (memory_axis, quality_axis) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    positions = range(len(trained))
    width = 0.4
    memory_axis.bar([p - width / 2 for p in positions], trained["peak_memory_gb"], width, label="peak (process RSS)")
    memory_axis.bar([p + width / 2 for p in positions], trained["weights_memory_gb"], width, label="weights")
    memory_axis.set_xticks(list(positions), trained["run"], rotation=20)
    memory_axis.set_ylabel("GB")
    memory_axis.set_title("Memory per run")
    memory_axis.legend()

    quality_axis.bar(list(positions), trained["heldout_loss"], color="tab:green", label="held-out loss")
    quality_axis.axhline(base["heldout_loss"], color="gray", linestyle="--", label="base model loss")
    quality_axis.set_xticks(list(positions), trained["run"], rotation=20)
    quality_axis.set_ylabel("held-out loss (lower is better)")
    share_axis = quality_axis.twinx()
    share_axis.plot(list(positions), trained["emoji_share"], "o", color="tab:orange", label="emoji share")
    share_axis.axhline(base["emoji_share"], color="tab:orange", linestyle=":", label="base emoji share")
    share_axis.set_ylim(0, 1.05)
    share_axis.set_ylabel("share of answers with emoji")
    quality_axis.set_title("Quality per run")
    handles = quality_axis.get_legend_handles_labels()[0] + share_axis.get_legend_handles_labels()[0]
    quality_axis.legend(handles=handles, loc="lower left", fontsize=8)
    figure.tight_layout()
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png")
    plt.close(figure)


def write_report(run_files: dict[str, dict], base_eval_path, out_csv, out_md, loss_png, memory_png) -> pd.DataFrame:
    """`run_files` maps a run name to the paths of its train.json and eval json."""
    runs = {name: {"train": read_json(paths["train"]), "eval": read_json(paths["eval"])}
            for name, paths in run_files.items()}
    base_eval = read_json(base_eval_path)
    table = summary_table(runs, base_eval)
    with atomic_file(out_csv) as handle:
        table.to_csv(handle, index=False)
    plot_loss_curves(runs, loss_png)
    plot_memory_quality(table, memory_png)

    first = next(iter(runs.values()))
    versions = first["train"]["provenance"]["versions"]
    commit = first["train"]["provenance"]["workflow_commit"] or "unknown (not a git checkout)"
    lines = [
        "# loragrid report",
        "",
        f"{len(runs)} runs on {first['train']['device']} ({first['train']['compute_dtype']} compute), "
        f"{base_eval['questions']} held-out questions, template `{base_eval['template']}`.",
        "",
        "## Memory and quality",
        "",
        _markdown_table(table),
        "",
        "Peak memory is the training process's peak resident memory on a CPU (loading included), "
        "or CUDA's max allocated memory on a GPU. Weights memory counts parameters and buffers at "
        "their stored size (4-bit and 8-bit weights packed). Held-out loss is the mean loss per "
        "answer token of the reference answers; emoji share is the share of generated answers with "
        "at least one emoji; chrF compares generated answers with the references.",
        "",
        f"![training loss]({Path(loss_png).name})",
        "",
        f"![memory and quality]({Path(memory_png).name})",
        "",
        "## Provenance",
        "",
        f"Workflow commit: `{commit}`. Packages: "
        + ", ".join(f"{name} {version}" for name, version in versions.items()) + ".",
        "",
        "| run | settings sha256 | model sha256 | train split sha256 |",
        "|:--|:--|:--|:--|",
        *(f"| {name} | `{files['train']['provenance']['settings_sha256'][:12]}` "
          f"| `{files['train']['provenance']['input_sha256']['model'][:12]}` "
          f"| `{files['train']['provenance']['input_sha256']['train_split'][:12]}` |" for name, files in runs.items()),
        "",
    ]
    with atomic_file(out_md) as handle:
        handle.write("\n".join(lines))
    return table
