"""Command line: `python -m loragrid SUBCOMMAND --help`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import LoragridError


def chat_command(args) -> None:
    from .chat import Chat, interactive

    if args.question is not None and not args.question.strip():  # a script's empty variable: no silent prompt
        raise LoragridError("--question is empty: give the question, or leave --question out to chat interactively")
    chat = Chat(args.directory, args.run, merged=args.merged, load_in_4bit=args.load_in_4bit,
                max_new_tokens=args.max_new_tokens, trust_remote_code=args.trust_remote_code,
                experiment=args.experiment, system=args.system)
    if args.question is not None:
        print(chat.answer(args.question))
    else:
        interactive(chat)


def runs_command(args) -> None:
    from snakemake.cli import parse_config

    from .config import checked_runs, experiment_name, load_config

    # The Snakefile's own loader, with the values parsed as `snakemake --config` parses them: a bad config is
    # named here, before Snakemake builds its plan.
    try:
        overrides = parse_config(args.config)
    except ValueError as error:
        raise LoragridError(f"--config {' '.join(args.config)}: {error}; give KEY=VALUE pairs, as "
                            "`snakemake --config` takes them, e.g. --config template=plain") from None
    config = load_config(args.configfile, overrides)
    runs = checked_runs(config, workdir=args.directory)
    results = f"results/{experiment_name(config)}"
    plan = snakemake_plan(args.directory, args.configfile, args.config)
    print(f"experiment {experiment_name(config)} ({results})")
    for name, settings in runs.items():
        print(f"{name:24} {settings['method']:7} {run_status(plan, results, name)}")


def memory_command(args) -> None:
    import json

    from .estimate import (
        EAGER_ONLY_MODEL_TYPES,
        model_sizes,
        projection,
        total_parameters,
        unchecked_architecture,
        unknown_shape,
    )

    try:
        config = json.loads(Path(args.model).read_text(encoding="utf-8"))
        no_estimate = unknown_shape(config)
    except (OSError, ValueError, AttributeError) as error:
        raise LoragridError(f"--model {args.model}: not a readable decoder config.json ({error!r})") from None
    if no_estimate:
        raise LoragridError(f"--model {args.model}: {no_estimate}")
    sizes = model_sizes(config)
    settings = {"micro_batch_size": args.micro_batch, "lora_r": args.lora_r, "target_modules": "all-linear",
                "lora_dropout": 0.0, "optimizer": args.optimizer,
                "gradient_checkpointing": {"on": True, "off": False}.get(args.gradient_checkpointing, "auto")}
    budget = args.budget_gb * 1e9 if args.budget_gb else None
    if args.attention == "auto":  # what transformers runs on a GPU: SDPA cannot softcap attention scores
        eager = sizes["model_type"] in EAGER_ONLY_MODEL_TYPES or sizes["attention_softcapping"]
        args.attention = "eager" if eager else "sdpa"
    rows = projection(sizes, settings, args.sequence, args.labelled_share, args.attention, budget, foreach=True)
    parameters = total_parameters(sizes)
    print(f"{args.model}: {parameters / 1e9:.2f}B parameters; "
          f"micro-batch {args.micro_batch} x {args.sequence} tokens, "
          f"{args.labelled_share:.0%} labelled, LoRA r={args.lora_r} on every linear layer, {args.optimizer}, "
          f"{args.attention} attention (GB):")
    parts = ("weights", "gradients", "optimizer", "activations", "temporaries")
    header = ["method", "checkpointing", *parts, "training memory"] + (["largest micro-batch"] if budget else [])
    print(" | ".join(header))
    for row in rows:
        cells = [row["method"], "on" if row["gradient_checkpointing"] else "off",
                 *(f"{row['breakdown'][part] / 1e9:.2f}" for part in parts), f"{row['total_bytes'] / 1e9:.2f}"]
        if budget:
            cells.append(largest_micro_batch_cell(row["largest_micro_batch"], args.budget_gb))
        print(" | ".join(cells))
    warning = unchecked_architecture(sizes)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def largest_micro_batch_cell(largest: int | None, budget_gb: float) -> str:
    from .estimate import MICRO_BATCH_CAP

    if largest is None:
        return f"none fits {budget_gb:g} GB"
    # The search stops at the cap, so a larger micro-batch may fit too.
    return f"{largest} or more" if largest == MICRO_BATCH_CAP else str(largest)


def snakemake_plan(directory: Path, configfiles: list[str], config: list[str]) -> dict[str, tuple[str, str]]:
    """Snakemake's own view of each output of the workflow, {path: (status, plan)}, from `snakemake --summary`:
    whatever it would redo (a changed setting, template, split, model or code) shows as it would in a dry run."""
    import subprocess

    command = [sys.executable, "-m", "snakemake", "--summary", "--cores", "1"]
    # Snakemake runs in `directory`; the config files are named from here, as load_config read them.
    command += ["--configfile", *(str(Path(path).resolve()) for path in configfiles)] if configfiles else []
    command += ["--config", *config] if config else []
    result = subprocess.run(command, cwd=directory, capture_output=True, text=True)
    if result.returncode:
        raise LoragridError(f"`snakemake --summary` in {directory} failed: {result.stderr.strip()[-2000:]}")
    rows = [line.split("\t") for line in result.stdout.splitlines() if line.count("\t") == 5]
    return {path: (status, plan) for path, _, _, _, status, plan in rows[1:]}


def run_status(plan: dict[str, tuple[str, str]], results: str, name: str) -> str:
    """How far a run got, and whether Snakemake would train it again (and why)."""
    trained = plan.get(f"{results}/runs/{name}/train.json", ("missing", ""))
    evaluated = plan.get(f"{results}/eval/{name}.json", ("missing", ""))
    if trained[0] == "missing":
        return "not trained"
    if trained[1] != "no update":
        # --summary names a changed setting, input set or code of the job itself; "ok" means the cause lies
        # elsewhere: an input made again (a split or tokenization), or a change that only a dry run explains.
        why = "an input or its code changed: `snakemake -n` says which" if trained[0] == "ok" else trained[0]
        return f"trained; snakemake trains it again ({why})"
    return "evaluated" if evaluated[0] != "missing" and evaluated[1] == "no update" else "trained"


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="python -m loragrid",
        description="loragrid: reproducible LoRA/QLoRA fine-tuning. The workflow itself runs with "
                    "`snakemake --cores 1 all`; these commands work with its config and results.",
    )
    commands = main.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = commands.add_parser(
        "chat", help="talk to a finished run (or 'base') with its template and generation settings",
        description="Answer questions with a finished run: interactively, or once with --question. "
                    "Each question is asked on its own, with the run's prompt template and generation settings.",
    )
    chat.add_argument("--run", required=True, help="run name as in the report, or 'base' for the untuned model")
    chat.add_argument("--merged", action="store_true", help="load the merged model "
                      "(results/EXPERIMENT/runs/RUN/merged) instead of base model + adapter")
    chat.add_argument("--experiment", help="the experiment under results/ (default: the only one with answers)")
    chat.add_argument("--load-in-4bit", action="store_true",
                      help="load the weights as 4-bit NF4 with bitsandbytes (as QLoRA trains them)")
    chat.add_argument("--question", help="answer this one question and exit")
    chat.add_argument("--system", help="a system prompt before each question (as a record's `system` field)")
    chat.add_argument("--max-new-tokens", type=above_zero(int), help="override the run's generate.max_new_tokens")
    chat.add_argument("--directory", type=Path, default=Path("."),
                      help="the workflow folder that holds results/ and resources/ (default: .)")
    chat.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    chat.set_defaults(handler=chat_command)

    runs = commands.add_parser(
        "runs", help="list the runs a config resolves to and how far each got",
        description="List the runs that the config's grid: and runs: resolve to, and how far each got "
                    "(not trained; trained, and trained again by the next snakemake run, with the reason; trained; "
                    "evaluated), as Snakemake's own plan (`snakemake --summary`) has it.",
    )
    runs.add_argument("--configfile", nargs="+", default=[],
                      help="config files merged over config/config.yaml, later ones over earlier ones")
    runs.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE",
                      help="values merged over the config files, as `snakemake --config` takes them")
    runs.add_argument("--directory", type=Path, default=Path("."), help="the workflow folder (default: .)")
    runs.set_defaults(handler=runs_command)
    add_memory_command(commands)
    return main


def above_zero(kind: type):
    """An argparse type: a number of `kind` above 0."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            whole = "whole " if kind is int else ""
            raise argparse.ArgumentTypeError(f"expected a {whole}number above 0, got {text!r}")
        return value
    return parse


def share(text: str) -> float:
    """An argparse type: a share above 0, at most 1."""
    value = above_zero(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a share above 0 and at most 1, got {text!r}")
    return value


def add_memory_command(commands) -> None:
    from .config import load_schema

    optimizers = load_schema()["$defs"]["run"]["properties"]["optimizer"]["enum"]
    memory = commands.add_parser(
        "memory", help="project what full, LoRA and QLoRA training hold for a model's config.json",
        description="The memory estimate (checked against measurements, docs/memory.md) for a decoder's "
                    "config.json, e.g. config/models/qwen2.5-7b.json, per method; with --budget-gb also the "
                    "largest micro-batch that fits. Training memory only: add the process's own (~1 GB on a "
                    "CPU, the CUDA context on a GPU).",
    )
    memory.add_argument("--model", required=True, help="a Hugging Face config.json of a Llama/Qwen/Gemma decoder")
    memory.add_argument("--micro-batch", type=above_zero(int), default=1, help="rows per micro-batch (default 1)")
    memory.add_argument("--sequence", type=above_zero(int), default=512, help="tokens per row (default 512)")
    memory.add_argument("--labelled-share", type=share, default=0.5,
                        help="share of positions with a label, i.e. answer tokens (default 0.5)")
    memory.add_argument("--lora-r", type=above_zero(int), default=16, help="LoRA rank (default 16)")
    memory.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
                        help="auto (default): on for QLoRA, off for full and LoRA")
    memory.add_argument("--attention", choices=["auto", "sdpa", "eager"], default="auto",
                        help="auto (default): as on a GPU, sdpa (eager for Gemma 2); eager as on a CPU")
    memory.add_argument("--optimizer", choices=optimizers, default="adamw_torch_fused",
                        help="training.optimizer (default adamw_torch_fused, the workflow's); adamw_torch as on a "
                             "GPU, where its step holds a copy of every trainable parameter")
    memory.add_argument("--budget-gb", type=above_zero(float),
                        help="find the largest micro-batch (up to 1024) that fits this many GB")
    memory.set_defaults(handler=memory_command)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.handler(args)
    except LoragridError as error:
        print(f"loragrid {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def entry_point(argv=None) -> int:
    """main, quiet when the reader of stdout stops early (`... | head -1`), as `ls | head` is: Python ignores
    SIGPIPE, so a write to the closed pipe raises BrokenPipeError, here or in the flush at exit."""
    try:
        try:
            return main(argv)
        finally:  # --help's SystemExit too: its text may still sit in the buffer
            sys.stdout.flush()
    except BrokenPipeError:
        # The interpreter flushes stdout once more at exit; devnull gives that flush nowhere to fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # what the shell reports for a command SIGPIPE ended (`set -o pipefail` sees it)


if __name__ == "__main__":
    sys.exit(entry_point())
