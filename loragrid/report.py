"""report: the comparison table, plots, generation samples and per-run pages of every run against the base model.

Markdown (report.md) is for terminals and code-hosting sites; the HTML pieces (summary.html,
samples.html, runs/{run}.html) are what `snakemake --report` shows inline.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import re
from collections import Counter
from pathlib import Path

import pandas as pd

from .common import atomic_dir, atomic_file, read_json, read_jsonl, write_json

log = logging.getLogger("loragrid.report")

COLUMNS = {
    "run": "run",
    "method": "method",
    "gradient_checkpointing": "checkpointing",
    "training_memory_gb": "training memory (GB)",
    "weights_gb": "weights (GB)",
    "gradients_gb": "gradients (GB)",
    "optimizer_gb": "optimizer state (GB)",
    "activations_gb": "activations (GB)",
    "temporaries_gb": "temporaries (GB)",
    "other_gb": "other (GB)",
    "estimated_memory_gb": "estimated (GB)",
    "trainable_params": "trainable params",
    "trainable_percent": "trainable %",
    "loss_vs_full_percent": "held-out loss, % of full",
    "emoji_vs_full_percent": "emoji share, % of full",
    "process_peak_rss_gb": "process peak RSS (GB, secondary)",
    "heldout_loss": "held-out loss",
    "emoji_share": "emoji share",
    "chrf": "chrF",
    "train_minutes": "train time (min)",
    "train_tokens_per_second": "train tok/s",
    "generation_tokens_per_second": "gen tok/s",
    "settings_sha256": "settings sha256",
}
BREAKDOWN = {"weights_gb": "W", "gradients_gb": "G", "optimizer_gb": "O", "activations_gb": "A",
             "temporaries_gb": "T", "other_gb": "other"}
# The seed's memory table (method | memory | trainable params | relative performance), with where
# the memory goes; quality and speed follow in a second table.
MEMORY_TABLE = ["run", "method", "gradient_checkpointing", "training_memory_gb", "breakdown", "estimated_memory_gb",
                "trainable_params", "trainable_percent", "loss_vs_full_percent", "emoji_vs_full_percent",
                "process_peak_rss_gb"]
QUALITY_TABLE = ["run", "method", "heldout_loss", "emoji_share", "chrf", "train_minutes", "train_tokens_per_second",
                 "generation_tokens_per_second"]

FORMATS = {
    "training_memory_gb": "{:.2f}", "estimated_memory_gb": "{:.2f}", "process_peak_rss_gb": "{:.2f}",
    **{column: "{:.3f}" for column in BREAKDOWN},
    "trainable_params": "{:,.0f}", "trainable_percent": "{:.2f}", "loss_vs_full_percent": "{:.1f}",
    "emoji_vs_full_percent": "{:.0f}", "heldout_loss": "{:.3f}", "emoji_share": "{:.2f}", "chrf": "{:.1f}",
    "train_minutes": "{:.1f}", "train_tokens_per_second": "{:.0f}", "generation_tokens_per_second": "{:.0f}",
}

# Quality measures plotted against memory: (column, axis label, True when higher is better).
QUALITY_MEASURES = (
    ("heldout_loss", "held-out loss (lower is better)", False),
    ("emoji_share", "share of answers with emoji (higher is better)", True),
)

MEMORY_NOTE = (
    "Training memory is the peak of what training holds at its longest micro-batch with the optimizer state "
    "of later steps, measured by exact tensor accounting on a CPU (every live tensor storage, counted once) "
    "over the first two steps (without length grouping, on to the longest example's step; a resumed run keeps "
    "the steps measured before its checkpoint), or CUDA's max allocated memory over the run on a GPU; the "
    "breakdown is the tensor accounting's at its peak: W weights as held (4-bit and 8-bit weights packed), "
    "G gradients, O optimizer state, A activations kept for the backward pass, T temporaries of the "
    "backward pass and the optimizer step; a run on several GPUs (DDP) shows one process's, one GPU's. "
    "The estimate is loragrid's formula for the same step's micro-batches (docs/memory.md; – where the "
    "model's config.json is not Llama-style). Process peak "
    "RSS is the training process's resident high-water mark during training (libraries, the allocator's "
    "free memory and the Python heap included): a secondary figure. "
    "Held-out loss is the mean loss per answer token of the reference answers (each ending with its EOS, the same "
    "tokens for every model); emoji share is the share "
    "of generated answers with at least one emoji; chrF compares generated answers with the references."
)
RANDOM_WEIGHTS_NOTE = (
    "The model has random weights (model source random:): the memory columns are real, the quality "
    "columns are meaningless."
)

# Scoped to .loragrid: the report's landing page embeds summary.html into its own page.
HTML_STYLE = """
.loragrid { font-family: system-ui, sans-serif; color: #222; }
.loragrid table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
.loragrid th, .loragrid td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
.loragrid th { background: #f2f2f2; }
.loragrid td.answer { max-width: 28rem; white-space: pre-wrap; }
.loragrid caption { text-align: left; font-weight: bold; padding: 0.3rem 0; }
.loragrid .scroll { overflow-x: auto; max-width: 100%; }
.loragrid img { max-width: 100%; }
"""


def training_memory_bytes(memory: dict) -> float:
    """CUDA's max allocated memory on a GPU (the field's convention), the measured tensor peak on a CPU;
    NaN for a run that trained no step in its last attempt (resumed after its final checkpoint)."""
    return memory.get("cuda_max_allocated_bytes") or memory.get("training_peak_bytes") or float("nan")


def estimated_breakdown(train: dict) -> dict:
    """The estimate at the measured step's shape by category; empty where the architecture has none."""
    estimate = train["memory_estimate"]
    return {} if estimate is None else estimate.get("at_measured_step", estimate)["breakdown"]


def _memory_columns(train: dict) -> dict:
    memory = train["memory"]
    estimated = estimated_breakdown(train)
    breakdown = memory.get("breakdown", {})
    return {
        "gradient_checkpointing": "on" if train["gradient_checkpointing"] else "off",
        "training_memory_gb": training_memory_bytes(memory) / 1e9,
        **{column: breakdown.get(column[:-3], float("nan")) / 1e9 for column in BREAKDOWN},
        "estimated_memory_gb": sum(estimated.values()) / 1e9 if estimated else float("nan"),
        "process_peak_rss_gb": (memory.get("rss_peak_training_bytes") or memory["peak_rss_bytes"]) / 1e9,
    }


def summary_table(runs: dict[str, dict], base_eval: dict) -> pd.DataFrame:
    """One row per run plus the untuned base model; `runs` maps a name to {'train': ..., 'eval': ...}."""
    rows = [{"run": "base", "method": "none (untuned)", **_quality(base_eval)}]
    for name, files in runs.items():
        train = files["train"]
        rows.append({
            "run": name,
            "method": train["method"],
            **_memory_columns(train),
            "trainable_params": train["parameters"]["trainable"],
            "trainable_percent": train["parameters"]["trainable_percent"],
            "train_minutes": train["train_runtime_seconds"] / 60,
            "train_tokens_per_second": train["tokens_per_second"],
            "settings_sha256": train["provenance"]["settings_sha256"],
            **_quality(files["eval"]),
        })
    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if not c.endswith("vs_full_percent")])
    full = full_runs(table)
    reference = table[table["run"] == full[0]].iloc[0] if full else None
    for column, measure in (("loss_vs_full_percent", "heldout_loss"), ("emoji_vs_full_percent", "emoji_share")):
        known = reference is not None and reference[measure]
        table[column] = 100 * table[measure] / reference[measure] if known else None
    return table[list(COLUMNS)]


def full_runs(table: pd.DataFrame) -> list[str]:
    """The grid's full fine-tuning runs in grid order; the first is the reference of every "% of full" column."""
    return table.loc[table["method"] == "full", "run"].tolist()


def relative_note(full: list[str], bench: bool) -> str:
    """What the "% of full" columns divide by, or why the tables have none."""
    if not full:
        return "No full fine-tuning run in this grid: the relative columns (\"% of full\") are left out."
    scores = (", emoji share (higher is better) and benchmark scores" if bench
              else " and emoji share (higher is better)")
    reference = (f"the full fine-tuning run {full[0]}" if len(full) == 1 else
                 f"{full[0]}, the first of the grid's {len(full)} full fine-tuning runs ({', '.join(full)})")
    return f"\"% of full\" divides a run's held-out loss (lower is better){scores} by those of {reference}."


def _quality(evaluation: dict) -> dict:
    keys = ("heldout_loss", "emoji_share", "chrf", "generation_tokens_per_second")
    return {key: evaluation[key] for key in keys}


def _formatted(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Columns of the table as readable strings under readable names; `breakdown` joins the parts."""
    shown = pd.DataFrame(index=table.index)
    for column in columns:
        if column == "breakdown":
            shown["breakdown (GB)"] = [_breakdown_text(row) for _, row in table.iterrows()]
        elif column.startswith(BENCH):
            shown[benchmark_label(column)] = ["–" if pd.isna(v) else benchmark_format(column).format(v)
                                              for v in table[column]]
        elif column in FORMATS:
            shown[COLUMNS[column]] = [("–" if pd.isna(v) else FORMATS[column].format(v)) for v in table[column]]
        else:
            shown[COLUMNS[column]] = table[column].fillna("–")
    return shown


def _breakdown_text(row: pd.Series) -> str:
    if pd.isna(row["weights_gb"]):
        return "–"
    return " · ".join(f"{label} {row[column]:.2f}" for column, label in BREAKDOWN.items()
                      if column != "other_gb" or row[column] >= 0.005)


def pareto_front(memory: list[float], quality: list[float], higher_is_better: bool) -> list[int]:
    """Indices of the runs no other run beats on both memory (less) and quality, by increasing memory; a run
    without either figure (NaN: resumed after its last step, or not evaluated) is on no front."""
    sign = -1 if higher_is_better else 1
    measured = [i for i in range(len(memory)) if not (math.isnan(memory[i]) or math.isnan(quality[i]))]
    order = sorted(measured, key=lambda i: (memory[i], sign * quality[i]))
    front, best = [], float("inf")
    for i in order:
        if sign * quality[i] < best:
            front.append(i)
            best = sign * quality[i]
    return front


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(figure, path) -> None:
    figure.tight_layout()
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png")
    _pyplot().close(figure)


def plot_loss_curves(runs: dict[str, dict], path) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    for name, files in runs.items():
        curve = files["train"]["loss_curve"]
        steps = [point["step"] for point in curve]
        losses = pd.Series([point["loss"] for point in curve]).rolling(5, min_periods=1).mean()
        axis.plot(steps, losses, marker="." if len(steps) < 10 else None, label=name)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (rolling mean of 5)")
    axis.set_title("Training loss of every run")
    axis.legend()
    axis.grid(alpha=0.3)
    _save_png(figure, path)


def _readable_unit(values_gb) -> tuple[str, float]:
    """GB for model-sized numbers, MB below 1 GB (a tiny test model would show as 0.000 GB)."""
    return ("GB", 1.0) if max(values_gb) >= 1 else ("MB", 1e3)


STACK_COLORS = {"weights": "tab:orange", "gradients": "tab:green", "optimizer": "tab:purple",
                "activations": "tab:blue", "temporaries": "tab:cyan", "other": "tab:gray"}


def plot_memory(runs: dict[str, dict], path) -> None:
    """Per run, what training holds by category: measured (left bar) beside estimated (right, hatched).
    The process's resident peak stays in the table: its libraries and heap would dwarf a small model."""
    plt = _pyplot()
    names = list(runs)
    measured = [runs[n]["memory"].get("breakdown", {}) for n in names]
    estimated = [estimated_breakdown(runs[n]) for n in names]
    unit, scale = _readable_unit([sum(m.values()) / 1e9 for m in measured + estimated])
    scale /= 1e9
    figure, axis = plt.subplots(figsize=(max(7, 1.5 * len(names) + 3), 4.5), dpi=110)
    for offset, parts, hatch in ((-0.2, measured, None), (0.2, estimated, "//")):
        bottoms = [0.0] * len(names)
        for category, color in STACK_COLORS.items():
            heights = [part.get(category, 0) * scale for part in parts]
            if category == "other" and max(heights) < 0.01 * max(bottoms):  # a few bookkeeping tensors
                continue
            axis.bar([i + offset for i in range(len(names))], heights, width=0.38, bottom=bottoms, color=color,
                     hatch=hatch, edgecolor="white", label=category if hatch is None else None)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
        for i, total in enumerate(bottoms):
            # An empty measured bar is a run resumed after its last checkpoint: it trained no step to measure.
            label = f"{total:.3g}" if parts[i] else "no estimate" if hatch else "not measured"
            axis.annotate(label, (i + offset, total), ha="center", va="bottom", fontsize=7)
    axis.set_xticks(range(len(names)), [f"{n}\nmeasured | estimated" for n in names], fontsize=8)
    axis.set_ylabel(unit)
    axis.set_title("What training holds at its peak, by category")
    axis.legend(fontsize=8, loc="upper right")
    axis.margins(y=0.15)
    _save_png(figure, path)


def plot_quality_vs_memory(table: pd.DataFrame, path) -> None:
    """One panel per quality measure against peak memory; the Pareto front is drawn as a line."""
    plt = _pyplot()
    trained = table[table["run"] != "base"].reset_index(drop=True)
    base = table[table["run"] == "base"].iloc[0]
    memory = trained["training_memory_gb"].tolist()
    figure, axes = plt.subplots(1, len(QUALITY_MEASURES), figsize=(11, 4.2), dpi=110)
    for axis, (column, label, higher_is_better) in zip(axes, QUALITY_MEASURES):
        quality = trained[column].tolist()
        front = pareto_front(memory, quality, higher_is_better)
        shown = [i for i in range(len(trained)) if not (math.isnan(memory[i]) or math.isnan(quality[i]))]
        others = [i for i in shown if i not in front]
        axis.scatter([memory[i] for i in others], [quality[i] for i in others], color="tab:gray", label="dominated")
        axis.plot([memory[i] for i in front], [quality[i] for i in front], "o-", color="tab:red",
                  label="Pareto front")
        for i in shown:
            axis.annotate(trained["run"][i], (memory[i], quality[i]), textcoords="offset points", xytext=(4, 4),
                          fontsize=8)
        left_out = [_left_out(trained["run"][i], memory[i], column) for i in range(len(trained)) if i not in shown]
        if left_out:  # a run without a point would otherwise vanish from the plot unremarked
            axis.set_title("left out: " + ", ".join(left_out), fontsize=8)
        axis.axhline(base[column], color="tab:blue", linestyle="--", label="base model")
        axis.set_xlabel("training memory (GB)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("Quality against memory")
    _save_png(figure, path)


def _left_out(name: str, memory: float, column: str) -> str:
    return f"{name} ({'memory not measured' if math.isnan(memory) else 'no ' + COLUMNS[column]})"


def sample_answers(generations: dict[str, list[dict]], count: int) -> list[dict]:
    """The first `count` held-out questions with each model's answer: {'question', 'reference', 'answers'}."""
    base = generations["base"][:count]
    by_id = {name: {g["id"]: g["answer"] for g in answers} for name, answers in generations.items()}
    return [
        {"question": g["question"], "reference": g["reference"],
         "answers": {name: answers[g["id"]] for name, answers in by_id.items()}}
        for g in base
    ]


EMPTY_ANSWER = "(empty answer)"
# What Markdown reads as markup inside a table cell, backslash-escaped: emphasis (* _), strikethrough (~), code
# (`), links and images ([ ]), GitHub's math ($), the cell separator (|) and the backslash itself, in one pass,
# so an escape stays an escape. A leading # or - makes no heading or list inside a cell: it shows as written.
MARKDOWN_MARKUP = re.compile(r"([\\`*_\[\]~$|])")


def _markdown_cell(text: str) -> str:
    """Text as one cell of a Markdown table, shown as written: markup in a model's answer (HTML, *stars*, a
    [link](url), a stray backtick fence) would hide text, format it or swallow the table."""
    if not text:
        return f"*{EMPTY_ANSWER}*"
    escaped = html.escape(MARKDOWN_MARKUP.sub(r"\\\1", text), quote=False)
    return escaped.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")


def samples_markdown(samples: list[dict]) -> list[str]:
    lines = []
    for number, sample in enumerate(samples, 1):
        lines += [f"**{number}. {_markdown_cell(sample['question'])}**", "", "| model | answer |", "|:--|:--|",
                  f"| reference | {_markdown_cell(sample['reference'])} |"]
        lines += [f"| {name} | {_markdown_cell(answer)} |" for name, answer in sample["answers"].items()]
        lines.append("")
    return lines


def _html_page(title: str, body: str) -> str:
    """A page that also reads well embedded in another one: no <html>/<head>/<body> (optional in HTML5)."""
    return (f"<!DOCTYPE html>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>\n"
            f"<style>{HTML_STYLE}</style>\n<div class=\"loragrid\">\n<h2>{html.escape(title)}</h2>\n{body}\n</div>\n")


def _answer_cell(answer: str) -> str:
    return f'<td class="answer">{html.escape(answer) if answer else "<em>" + EMPTY_ANSWER + "</em>"}</td>'


def samples_html(samples: list[dict]) -> str:
    """One table per question, the reference and every model's answer side by side."""
    tables = []
    for number, sample in enumerate(samples, 1):
        names = ["reference", *sample["answers"]]
        answers = [sample["reference"], *sample["answers"].values()]
        tables.append(
            f"<table><caption>{number}. {html.escape(sample['question'])}</caption>"
            "<tr>" + "".join(f"<th>{html.escape(name)}</th>" for name in names) + "</tr>"
            "<tr>" + "".join(_answer_cell(answer) for answer in answers) + "</tr></table>"
        )
    return "\n".join(tables)


def _embedded_png(path) -> str:
    encoded = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<p><img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{encoded}"></p>'


def summary_html(tables: list[tuple[str, pd.DataFrame]], notes: list[str], plots) -> str:
    """The comparison tables and the plots, self-contained (the plots as data URIs)."""
    return "\n".join([
        *(f"<h3>{html.escape(title)}</h3>" + '<div class="scroll">' + shown.to_html(index=False, border=0) + "</div>"
          for title, shown in tables),
        *(_embedded_png(plot) for plot in plots),
        *(f"<p>{html.escape(note)}</p>" for note in notes),
    ])


# Secondary and CUDA figures shown on each run's page.
MEMORY_DETAILS = ("rss_after_loading_bytes", "rss_peak_training_bytes", "peak_rss_bytes",
                  "cuda_allocated_after_loading_bytes", "cuda_max_allocated_bytes", "cuda_max_reserved_bytes")


def _key_value_table(caption: str, values: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in values.items())
    return f"<table><caption>{html.escape(caption)}</caption>{rows}</table>"


def run_page(name: str, files: dict, row: pd.Series, samples: list[dict]) -> str:
    """Everything about one run: its settings, what training measured, its quality and its answers."""
    train = files["train"]
    measured = {COLUMNS[column]: fmt.format(row[column])
                for column, fmt in FORMATS.items() if not pd.isna(row[column])}
    memory = train["memory"]
    measured.update({key.replace("_", " "): f"{memory[key] / 1e9:.3f} GB"
                     for key in MEMORY_DETAILS if memory.get(key)})
    own_answers = [{**s, "answers": {"base": s["answers"]["base"], name: s["answers"][name]}} for s in samples]
    body = "\n".join([
        _key_value_table("Measured", measured),
        _key_value_table("Settings", train["provenance"]["settings"]),
        _key_value_table("Provenance", {"settings sha256": train["provenance"]["settings_sha256"],
                                        **{f"{k} sha256": v for k, v in train["provenance"]["input_sha256"].items()},
                                        "workflow commit": train["provenance"]["workflow_commit"]}),
        "<h3>Answers next to the base model</h3>",
        samples_html(own_answers),
    ])
    return _html_page(f"Run {name} ({train['method']})", body)


EXPORT_NOTE = (
    "GGUF files made by llama.cpp's converter (q4_k_m by llama.cpp's quantizer from f16) and loaded in "
    "llama.cpp (llama-cpp-python). Top-1 agreement: the share of llama.cpp's first {tokens} greedy answer "
    "tokens per held-out question that are transformers' top-1 token on the same merged model after the same "
    "tokens. Emoji shares of llama.cpp's and transformers' answers; their answers are among the samples."
)


def export_table(summaries: list[dict]) -> pd.DataFrame:
    """One row per exported file: its size and type, and how it agrees with transformers."""
    rows = [{"run": summary["run"], "type": gguf_type, "file": record["file"],
             "size (MB)": f"{record['bytes'] / 1e6:.1f}",
             "top-1 agreement": f"{record['agreement']:.1%} ({record['agreeing_tokens']}/{record['compared_tokens']})",
             "emoji share (llama.cpp)": f"{record['emoji_share']:.2f}",
             "emoji share (transformers)": f"{summary['transformers_emoji_share']:.2f}",
             "emoji share difference": f"{record['emoji_share_difference']:.2f}",
             "llama.cpp tok/s": f"{record['llama_cpp_tokens_per_second']:.0f}"}
            for summary in summaries for gguf_type, record in summary["types"].items()]
    return pd.DataFrame(rows)


def export_answers(summaries: list[dict], exports) -> dict[str, list[dict]]:
    """llama.cpp's answers to the held-out questions, as generations of `RUN (llama.cpp TYPE)`."""
    return {f"{summary['run']} (llama.cpp {gguf_type})": read_jsonl(Path(path).parent / record["file"])
            for summary, path in zip(summaries, exports) for gguf_type, record in summary["answers"].items()}


def comparison_tables(table: pd.DataFrame, runs: dict, bench, summaries: list) -> tuple[list, list[str]]:
    """The report's (title, formatted table) pairs and the notes below them."""
    full = full_runs(table)
    # Without a full run every relative value would be "–": the columns go, and the note says why.
    memory_columns = (MEMORY_TABLE + benchmark_columns(table, relative=True) if full
                      else [c for c in MEMORY_TABLE if not c.endswith("vs_full_percent")])
    tables = [("Memory comparison", _formatted(table[table["run"] != "base"], memory_columns)),
              ("Quality and speed", _formatted(table, QUALITY_TABLE))]
    benchmark_table = ["run", "method", *benchmark_columns(table, False)]
    tables += [("Benchmarks (lm-evaluation-harness)", _formatted(table, benchmark_table))] * bool(bench)
    random_weights = any(files["train"].get("model_random_init") for files in runs.values())
    notes = [MEMORY_NOTE, relative_note(full, bool(bench))] + ([RANDOM_WEIGHTS_NOTE] if random_weights else [])
    resumed = {name: files["train"]["resumed_from_step"] for name, files in runs.items()
               if files["train"].get("resumed_from_step")}
    if resumed:  # the Trainer times only the attempt that finished
        where = ", ".join(f"{name} at step {step}" for name, step in resumed.items())
        notes.append(f"Resumed from a checkpoint: {where}; train time and tokens/s are the last attempt's.")
    notes += [BENCH_NOTE] * bool(bench)
    if summaries:
        tables.append(("Exported GGUF files", export_table(summaries)))
        notes.append(EXPORT_NOTE.format(tokens=summaries[0]["check_tokens"]))
    return tables, notes


def _where_trained(runs: dict) -> str:
    """'4 runs on cpu (bfloat16 compute)'; each device named where they differ (gpus: is a run's own setting, and a
    CPU's memory figure is measured unlike a GPU's)."""
    devices = Counter(f"{run['train']['device']} ({run['train']['compute_dtype']} compute)" for run in runs.values())
    if len(devices) == 1:
        return f"{len(runs)} runs on {next(iter(devices))}"
    return f"{len(runs)} runs: " + ", ".join(f"{count} on {device}" for device, count in devices.items())


def report_markdown(runs: dict, base_eval: dict, tables, notes, samples, plots) -> list[str]:
    """report.md's lines: the tables, notes and plots, the sample answers and every run's provenance."""
    first = next(iter(runs.values()))
    versions = first["train"]["provenance"]["versions"]
    commit = first["train"]["provenance"]["workflow_commit"] or "unknown (not a git checkout)"
    lines = [
        "# loragrid report",
        "",
        f"{_where_trained(runs)}, "
        f"{base_eval['questions']} held-out questions, template `{base_eval['template']}`.",
        "",
        *(line for title, shown in tables
          for line in (f"## {title}", "", shown.to_markdown(index=False, disable_numparse=True), "")),
        *(line for note in notes for line in (note, "")),
        *(line for alt, plot in plots for line in (f"![{alt}]({Path(plot).name})", "")),
        "## Answers to held-out questions",
        "",
        *samples_markdown(samples),
        "## Provenance",
        "",
        f"Workflow commit: `{commit}`. Packages: "
        + ", ".join(f"{name} {version}" for name, version in versions.items()) + ".",
        "",
        "| run | settings sha256 | model sha256 | train split sha256 |",
        "|:--|:--|:--|:--|",
        *(f"| {name} | `{files['train']['provenance']['settings_sha256'][:12]}` "
          f"| `{files['train']['provenance']['input_sha256']['model'][:12]}` "
          f"| `{files['train']['provenance']['input_sha256']['train_split'][:12]}` |"
          for name, files in runs.items()),
        "",
    ]
    return lines


def write_report(run_files: dict[str, dict], base_files: dict, *, table_csv, table_html, markdown, loss_plot,
                 memory_plot, quality_plot, samples_page, runs_dir, sample_count: int = 4, exports=(),
                 benchmarks: dict | None = None, benchmark_plot=None, benchmark_json=None) -> pd.DataFrame:
    """Write every report file.

    `run_files` maps a run name to the paths of its train.json, eval json and generations
    jsonl ({'train', 'eval', 'generations'}); `base_files` has the base model's 'eval' and 'generations';
    `exports` lists the export summaries (gguf/RUN.json) where the GGUF export is on.
    """
    from .export import verify_exports

    summaries = [verify_exports(path) for path in exports]
    runs = {name: {"train": read_json(paths["train"]), "eval": read_json(paths["eval"])}
            for name, paths in run_files.items()}
    base_eval = read_json(base_files["eval"])
    generations = {"base": read_jsonl(base_files["generations"]),
                   **{name: read_jsonl(paths["generations"]) for name, paths in run_files.items()},
                   **export_answers(summaries, exports)}
    bench = read_benchmarks(benchmarks)  # `benchmarks`: {model name: its benchmark folder}; None when off
    table = with_benchmarks(summary_table(runs, base_eval), bench)
    samples = sample_answers(generations, sample_count)
    tables, notes = comparison_tables(table, runs, bench, summaries)
    with atomic_file(table_csv) as handle:
        table.to_csv(handle, index=False)
    plot_loss_curves(runs, loss_plot)
    plot_memory({name: files["train"] for name, files in runs.items()}, memory_plot)
    plot_quality_vs_memory(table, quality_plot)
    if bench:
        write_benchmark_files(table, bench, benchmark_plot, benchmark_json)
    plots = [memory_plot, quality_plot] + [benchmark_plot] * bool(bench)
    with atomic_file(table_html) as handle:
        handle.write(_html_page("Memory and quality of every run", summary_html(tables, notes, plots)))
    with atomic_file(samples_page) as handle:
        handle.write(_html_page("Answers to held-out questions", samples_html(samples)))
    with atomic_dir(runs_dir, manifest=False) as staging:  # pages of the HTML report, read by people only
        for (name, files), (_, row) in zip(runs.items(), table.iloc[1:].iterrows()):
            (staging / f"{name}.html").write_text(run_page(name, files, row, samples), encoding="utf-8")

    figures = [("training loss", loss_plot), ("memory per run", memory_plot),
               ("quality against memory", quality_plot)]
    figures += [("benchmarks against the base model", benchmark_plot)] * bool(bench)
    lines = report_markdown(runs, base_eval, tables, notes, samples, figures)
    with atomic_file(markdown) as handle:
        handle.write("\n".join(lines))
    log.info("report of %d runs written to %s", len(runs), Path(markdown).parent)
    return table


def write_index(results_root, experiment: str, description: dict) -> None:
    """Record this experiment and rewrite results/index.md: every experiment of the working directory.

    `description` holds the experiment's model and dataset sources and its run names. Run after a
    successful workflow run (the Snakefile's onsuccess), so a listed report is a finished one. The runs listed
    are the report's (its summary.csv): a later run of part of a grid (one training job) does not list runs the
    linked report does not show; configured runs it lacks are counted beside them.
    """
    from datetime import datetime, timezone

    root = Path(results_root)
    finished = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    write_json(root / experiment / "experiment.json", {**description, "finished": finished})
    lines = ["# Experiments in this working directory", "",
             "| experiment | model | dataset | runs | report | last finished |", "|:--|:--|:--|:--|:--|:--|"]
    for record in sorted(root.glob("*/experiment.json")):
        info, name = read_json(record), record.parent.name
        report = f"[report.md]({name}/report/report.md)" if (record.parent / "report/report.md").exists() else "–"
        runs = _index_runs(record.parent, info["runs"])
        lines.append(f"| {name} | `{info['model']}` | `{info['dataset']}` | {runs} | {report} | {info['finished']} |")
    with atomic_file(root / "index.md") as handle:
        handle.write("\n".join(lines) + "\n")


def _index_runs(folder: Path, configured: list[str]) -> str:
    """The runs of an experiment's report, and the configured runs it does not show yet."""
    summary = folder / "report/summary.csv"
    if not summary.exists():
        return f"none in a report yet ({len(configured)} configured: {', '.join(configured)})"
    runs = pd.read_csv(summary, dtype={"run": str}, keep_default_na=False)["run"]  # a run may be named 1 or NA
    reported = [run for run in runs if run != "base"]
    missing = [run for run in configured if run not in reported]
    shown = f"{len(reported)}: {', '.join(reported)}"
    return shown + (f" (not in the report: {', '.join(missing)})" if missing else "")


# Benchmark columns (rule benchmark, lm-evaluation-harness): "bench.TASK.METRIC", and the same
# with ".vs_full_percent" (the run's value as % of the full fine-tuning run's, as for held-out loss).
BENCH = "bench."
BENCH_NOTE = (
    "Benchmarks: lm-evaluation-harness on the base model and every run (merged model of a PEFT run), "
    "zero-shot, each task's headline metric. Perplexities (word_perplexity, byte_perplexity, bits_per_byte, "
    "any other *perplexity*) are lower is better; every other score (acc: multiple-choice accuracy, "
    "exact_match of a generate_until task, ...) is higher is better. The plot shows each run's change "
    "against the base model, per task: in points for a higher-is-better score between 0 and 1, in % "
    "otherwise; green where the run does better, red where it does worse."
)
# Headline metrics where lower is better, beside any metric named *perplexity*; every other one is a score.
LOWER_IS_BETTER = ("word_perplexity", "byte_perplexity", "token_perplexity", "bits_per_byte")


def read_benchmarks(folders: dict | None) -> dict[str, dict]:
    """{model name: summary.json of its benchmark folder}; {} where benchmarks are off."""
    return {name: read_json(Path(folder) / "summary.json") for name, folder in (folders or {}).items()}


def with_benchmarks(table: pd.DataFrame, benchmarks: dict[str, dict]) -> pd.DataFrame:
    """The summary table plus each task's headline metric per model, and as % of the full run's."""
    table = table.copy()
    if not benchmarks:
        return table
    full = full_runs(table)
    for task, summary in benchmarks["base"]["tasks"].items():
        column = f"{BENCH}{task}.{summary['headline']}"
        table[column] = [benchmarks[run]["tasks"][task][summary["headline"]] for run in table["run"]]
        reference = table.loc[table["run"] == full[0], column].iloc[0] if full else None
        table[f"{column}.vs_full_percent"] = 100 * table[column] / reference if reference else None
    return table


def benchmark_label(column: str) -> str:
    task, _, metric = column[len(BENCH):].partition(".")
    metric, _, relative = metric.partition(".")
    return f"{task} {metric}" + (", % of full" if relative else "")


def lower_is_better(column: str) -> bool:
    metric = column[len(BENCH):].partition(".")[2].partition(".")[0]
    return metric in LOWER_IS_BETTER or "perplexity" in metric


def _benchmark_change(column: str, base: float, values: pd.Series) -> tuple[pd.Series, list[str], str]:
    """Each run's change against the base (points for a score in [0, 1], % otherwise), its bar colours
    (green where the run does better) and the axis label."""
    lower = lower_is_better(column)
    points = not lower and all(0 <= v <= 1 for v in [base, *values] if not pd.isna(v))
    change = (values - base) * 100 if points else (values / base - 1) * 100
    better = -change if lower else change
    colors = ["tab:green" if b > 0 else "tab:red" if b < 0 else "tab:gray" for b in better]
    direction = "lower" if lower else "higher"
    return change, colors, f"{'points' if points else '% change'} against base ({direction} is better)"


def benchmark_format(column: str) -> str:
    if column.endswith("vs_full_percent"):
        return "{:.1f}"
    return "{:.3f}" if column.endswith(".acc") or column.endswith("acc_norm") else "{:.2f}"


def benchmark_columns(table: pd.DataFrame, relative: bool) -> list[str]:
    return [c for c in table.columns if c.startswith(BENCH) and c.endswith("vs_full_percent") == relative]


def plot_benchmark_changes(table: pd.DataFrame, path) -> None:
    """One panel per task: each run's change against the base model (scores in [0, 1] in points, others in %)."""
    plt = _pyplot()
    columns = benchmark_columns(table, relative=False)
    base = table[table["run"] == "base"].iloc[0]
    trained = table[table["run"] != "base"]
    names = trained["run"].tolist()
    panel = max(4.5, 0.6 * len(names) + 1.5)  # a bar per run, as plot_memory widens with its runs
    # Run names such as qlora4-r64-lr1e-4 overlap side by side once the bars are narrower than the names.
    slanted = max(map(len, names), default=0) * 0.08 > (panel - 1) / max(len(names), 1)
    figure, axes = plt.subplots(1, len(columns), figsize=(panel * len(columns) + 1, 4.5 if slanted else 4), dpi=110,
                                squeeze=False)
    for axis, column in zip(axes[0], columns):
        change, colors, ylabel = _benchmark_change(column, base[column], trained[column])
        axis.bar(names, change, color=colors)
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_title(f"{benchmark_label(column)} (base {benchmark_format(column).format(base[column])})", fontsize=9)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3, axis="y")
        if slanted:
            plt.setp(axis.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor", fontsize=8)
    figure.suptitle("Benchmarks: each run against the base model")
    _save_png(figure, path)


def write_benchmark_files(table: pd.DataFrame, benchmarks: dict[str, dict], plot_path, json_path) -> None:
    """evaluation_results.json (every model's scores per task, as the pruning guide's file keeps them) and
    the plot."""
    numbers = {name: {task: {key: value for key, value in scores.items() if isinstance(value, (int, float))}
                      for task, scores in summary["tasks"].items()}
               for name, summary in benchmarks.items()}
    write_json(json_path, numbers)
    plot_benchmark_changes(table, plot_path)
