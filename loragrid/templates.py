"""Prompt templates and tokenization, shared by train, evaluate and generate.

One function renders a prompt for all three stages: a model trained on one template and
asked in another answers endlessly or repeats itself.
"""

from __future__ import annotations

from .common import LoragridError

# The emoji tutorial's format: 用户 = user, 助手 = assistant.
PLAIN_TEMPLATE = "用户: {question} 助手: "
TEMPLATES = ("chat", "plain")


def render_prompt(tokenizer, template: str, messages: list[dict]) -> str:
    """The text the model sees before its answer; `messages` ends with the user's turn."""
    if template == "chat":
        if not tokenizer.chat_template:
            raise LoragridError("config key 'template': the model has no chat template; use template: plain")
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if template == "plain":
        return PLAIN_TEMPLATE.format(question=messages[-1]["content"])
    raise LoragridError(f"config key 'template': unknown template '{template}' (choose from {', '.join(TEMPLATES)})")


def prompt_token_ids(tokenizer, template: str, messages: list[dict]) -> list[int]:
    # A chat template writes its own special tokens; a plain prompt gets the tokenizer's (e.g. BOS).
    text = render_prompt(tokenizer, template, messages)
    return tokenizer(text, add_special_tokens=template != "chat")["input_ids"]


def tokenize_example(tokenizer, template: str, messages: list[dict], cutoff_len: int,
                     train_on_inputs: bool = False, add_eos_token: bool = True) -> dict | None:
    """input_ids and labels for one conversation whose last message is the answer.

    Labels cover only the answer (and EOS) unless `train_on_inputs`. Returns None when the
    prompt alone fills `cutoff_len`, so that no answer would be left to learn from.
    """
    prompt = prompt_token_ids(tokenizer, template, messages[:-1])
    answer = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
    if add_eos_token:
        answer = answer + [tokenizer.eos_token_id]
    if len(prompt) >= cutoff_len:
        return None
    truncated = len(prompt) + len(answer) > cutoff_len
    answer = answer[: cutoff_len - len(prompt)]
    input_ids = prompt + answer
    labels = input_ids.copy() if train_on_inputs else [-100] * len(prompt) + answer
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": labels,
        "truncated": truncated,
    }


def tokenize_split(tokenizer, template: str, records: list[dict], cutoff_len: int,
                   train_on_inputs: bool = False, add_eos_token: bool = True):
    """Tokenize prepared records; returns (examples, counts of dropped and truncated records)."""
    examples, dropped, truncated = [], [], 0
    for record in records:
        example = tokenize_example(tokenizer, template, record["messages"], cutoff_len, train_on_inputs, add_eos_token)
        if example is None:
            dropped.append(record["id"])
            continue
        truncated += example.pop("truncated")
        examples.append(example)
    return examples, {"dropped_prompt_too_long": dropped, "truncated": truncated}
