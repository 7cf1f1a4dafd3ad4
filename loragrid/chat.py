"""chat: talk to a finished run (or the base model) with the template and generation settings it was evaluated with."""

from __future__ import annotations

from pathlib import Path

import torch

from . import modeling
from .common import LoragridError, read_json
from .generate import generation_config
from .templates import TEMPLATES, answer_end_ids, conversation_token_ids
from .tokenized import load_tokenizer

QUIT_WORDS = ("exit", "quit")


def shown_template(template: str) -> str:
    """A named template by its name, a custom one quoted (its newlines escaped, its spaces visible)."""
    return template if template in TEMPLATES else repr(template)


def experiment_dir(workdir: Path, experiment: str | None) -> Path:
    """results/EXPERIMENT in the workflow folder; without a name, its only experiment with answers."""
    found = sorted(path.parent.name for path in (workdir / "results").glob("*/generations"))
    if experiment is not None:
        if experiment not in found:
            raise LoragridError(f"--experiment {experiment}: no {workdir / 'results' / experiment / 'generations'} "
                                f"(experiments with answers: {', '.join(found) or 'none'})")
        return workdir / "results" / experiment
    if len(found) == 1:
        return workdir / "results" / found[0]
    if not found:
        raise LoragridError(f"{workdir / 'results'} holds no answers yet; run `snakemake --cores 1 all` first")
    raise LoragridError(f"{len(found)} experiments in {workdir / 'results'} ({', '.join(found)}); "
                        "choose one with --experiment")


def finished_runs(results: Path) -> list[str]:
    return sorted(path.stem for path in (results / "generations").glob("*.json"))


def run_files(workdir: Path, results: Path, run: str, merged: bool) -> dict:
    """Where a run's weights are and how it was asked: {'model_dir', 'adapter_dir' or None, 'template', 'settings'}.

    The generation stage's record (results/EXPERIMENT/generations/RUN.json) names the template,
    the generation settings and the weights it used (merged, full model or base).
    """
    meta_path = results / "generations" / f"{run}.json"
    if not meta_path.exists():
        known = ", ".join(finished_runs(results)) or "none yet; run `snakemake --cores 1 all` first"
        raise LoragridError(f"run '{run}' has no {meta_path} (finished runs: {known})")
    meta = read_json(meta_path)
    adapter_dir = results / "runs" / run / "adapter"
    if merged or not adapter_dir.exists():
        model_dir = workdir / meta["model_dir"]
        if merged and not (adapter_dir.exists() and model_dir.name == "merged"):
            raise LoragridError(f"run '{run}' has no merged adapter (--merged is for LoRA and QLoRA runs)")
        return {"model_dir": checked_weights(run, model_dir), "adapter_dir": None, "template": meta["template"],
                "settings": meta["settings"]}
    base = read_json(adapter_dir / "adapter_config.json")["base_model_name_or_path"]
    return {"model_dir": checked_weights(run, workdir / base), "adapter_dir": adapter_dir,
            "template": meta["template"], "settings": meta["settings"]}


def checked_weights(run: str, model_dir: Path) -> Path:
    """The weights folder, if it is there: transformers takes a missing folder for a hub repository id and
    fails with an error about its spelling."""
    if not model_dir.is_dir():
        raise LoragridError(f"run '{run}': its weights {model_dir} are missing; run the workflow again "
                            "(`snakemake --cores 1 all`) to make them")
    return model_dir


def load_model(model_dir: Path, adapter_dir: Path | None, load_in_4bit: bool, trust_remote_code: bool = False):
    """The weights in the compute dtype, the base optionally as 4-bit NF4 (as QLoRA trains it), the adapter on top."""
    kwargs = {"attn_implementation": modeling.attention_implementation()}
    if load_in_4bit:
        kwargs["quantization_config"] = modeling.quantization_config("qlora4")
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = modeling.load_causal_lm(model_dir, modeling.compute_dtype(), trust_remote_code, **kwargs)
    if adapter_dir is not None:
        model = modeling.load_adapter(model, adapter_dir)
    if not load_in_4bit:  # bitsandbytes places quantized weights itself
        model = model.to(modeling.device())
    return model.eval()


class Chat:
    def __init__(self, workdir, run: str, merged: bool = False, load_in_4bit: bool = False,
                 max_new_tokens: int | None = None, trust_remote_code: bool = False, experiment: str | None = None,
                 system: str | None = None):
        from transformers.utils import logging as transformers_logging

        if max_new_tokens is not None and max_new_tokens < 1:  # here, not in transformers after the weights load
            raise LoragridError(f"max_new_tokens {max_new_tokens}: expected a whole number above 0")
        files = run_files(Path(workdir), experiment_dir(Path(workdir), experiment), run, merged)
        transformers_logging.disable_progress_bar()  # a loading bar per start clutters a chat
        self.run = run
        self.template = files["template"]
        # Before every question, as a record's `system` field is in training and generation.
        self.context = [{"role": "system", "content": system}] if system else []
        settings = dict(files["settings"])
        if max_new_tokens is not None:
            settings["max_new_tokens"] = max_new_tokens
        self.tokenizer = load_tokenizer(files["model_dir"], trust_remote_code, padding_side="left")
        self.model = load_model(files["model_dir"], files["adapter_dir"], load_in_4bit, trust_remote_code)
        self.config = generation_config(self.tokenizer, settings, answer_end_ids(self.tokenizer, self.template))
        self.description = (f"{run}: {'adapter on ' if files['adapter_dir'] else ''}{files['model_dir']}"
                            f"{' (4-bit)' if load_in_4bit else ''}, template {shown_template(self.template)}, "
                            f"max_new_tokens {settings['max_new_tokens']}, "
                            f"{'sampling' if settings['do_sample'] else 'greedy'}"
                            f"{f', system prompt {system!r}' if system else ''}")

    def prompt_ids(self, question: str) -> list[int]:
        messages = [*self.context, {"role": "user", "content": question}]
        return conversation_token_ids(self.tokenizer, self.template, messages)

    @torch.no_grad()
    def answer(self, question: str, stream: bool = False) -> str:
        """One answer to one question (each question is asked on its own, as in training and evaluation)."""
        from transformers import TextStreamer

        ids = self.prompt_ids(question)
        input_ids = torch.tensor([ids], device=self.model.device)
        # TextStreamer prints the answer to stdout as it is generated, then a newline.
        streaming = stream and self.config.num_beams == 1  # transformers streams greedy and sampled decoding only
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if streaming else None
        output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     generation_config=self.config, streamer=streamer)
        answer = self.tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
        if stream and not streaming:
            print(answer)
        return answer


def interactive(chat: Chat) -> None:
    print(f"{chat.description}\nAsk a question; 'exit', 'quit' or Ctrl-D ends.")
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            print()
            return
        if question.lower() in QUIT_WORDS:
            return
        if question:
            print(f"{chat.run}> ", end="", flush=True)
            chat.answer(question, stream=True)
