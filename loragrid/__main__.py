"""Command line: `python -m loragrid SUBCOMMAND --help`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import LoragridError


def chat_command(args) -> None:
    from .chat import Chat, interactive

    chat = Chat(args.directory, args.run, merged=args.merged, load_in_4bit=args.load_in_4bit,
                max_new_tokens=args.max_new_tokens, trust_remote_code=args.trust_remote_code)
    if args.question:
        print(chat.answer(args.question))
    else:
        interactive(chat)


def runs_command(args) -> None:
    import yaml
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import update_config, validate

    from .config import check_config, schema_path

    # Like the Snakefile: config/config.yaml first, then each --configfile merged over it.
    config = {}
    for path in [Path(args.directory) / "config" / "config.yaml", *args.configfile]:
        with open(path, encoding="utf-8") as handle:
            update_config(config, yaml.safe_load(handle) or {})
    try:
        validate(config, str(schema_path()))
    except WorkflowError as error:
        raise LoragridError(str(error)) from None
    runs = check_config(config, workdir=args.directory)
    for name, settings in runs.items():
        print(f"{name:24} {settings['method']:7} {run_status(Path(args.directory), name, settings)}")


def run_status(workdir: Path, name: str, settings: dict) -> str:
    """How far a run got, judged by its train.json's recorded settings and its evaluation."""
    from .common import read_json

    train_json = workdir / "results" / "runs" / name / "train.json"
    if not train_json.exists():
        return "not trained"
    trained_with = read_json(train_json)["provenance"]["settings"]
    if any(trained_with.get(key) != value for key, value in settings.items()):
        return "trained with other settings (snakemake re-runs it)"
    return "evaluated" if (workdir / "results" / "eval" / f"{name}.json").exists() else "trained"


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
    chat.add_argument("--merged", action="store_true",
                      help="load the merged model (results/runs/RUN/merged) instead of base model + adapter")
    chat.add_argument("--load-in-4bit", action="store_true",
                      help="load the weights as 4-bit NF4 with bitsandbytes (as QLoRA trains them)")
    chat.add_argument("--question", help="answer this one question and exit")
    chat.add_argument("--max-new-tokens", type=int, help="override the run's generate.max_new_tokens")
    chat.add_argument("--directory", type=Path, default=Path("."),
                      help="the workflow folder that holds results/ and resources/ (default: .)")
    chat.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    chat.set_defaults(handler=chat_command)

    runs = commands.add_parser(
        "runs", help="list the runs a config resolves to and how far each got",
        description="List the runs that the config's grid: and runs: resolve to, and how far each got "
                    "(not trained, trained with other settings, trained, evaluated).",
    )
    runs.add_argument("--configfile", nargs="+", default=[],
                      help="config files merged over config/config.yaml, later ones over earlier ones")
    runs.add_argument("--directory", type=Path, default=Path("."), help="the workflow folder (default: .)")
    runs.set_defaults(handler=runs_command)
    return main


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


if __name__ == "__main__":
    sys.exit(main())
