"""Prompt templates and tokenization, shared by train, merge, evaluate and generate.

One function renders a conversation for every stage: a model trained on one template and
asked in another answers endlessly or repeats itself.

A conversation is a list of messages: an optional `system` message, then user and assistant
turns in alternation. A user message may carry an `input` (alpaca's context field) next to its
`content`; templates with an Input section show it there, the others append it to the content.
"""

from __future__ import annotations

import contextlib
import string

from tqdm.auto import tqdm

from .common import LoragridError

# Named templates that are format strings. `prompt_input` is used when the user turn has an input.
STRING_TEMPLATES = {
    # The emoji tutorial's format: 用户 = user, 助手 = assistant.
    "plain": {"prompt": "用户: {instruction} 助手: "},
    # Stanford Alpaca / alpaca-lora's templates/alpaca.json.
    "alpaca": {
        "prompt": "Below is an instruction that describes a task. Write a response that appropriately "
                  "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
        "prompt_input": "Below is an instruction that describes a task, paired with an input that provides "
                        "further context. Write a response that appropriately completes the request.\n\n"
                        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    },
    # The Chinese alpaca layout: 指令 = instruction, 输入 = input, 回答 = answer.
    "alpaca_zh": {
        "prompt": "### 指令:\n{instruction}\n\n### 回答:\n",
        "prompt_input": "### 指令:\n{instruction}\n\n### 输入:\n{input}\n\n### 回答:\n",
    },
}
TEMPLATES = ("chat", *STRING_TEMPLATES)
PLACEHOLDERS = ("instruction", "input", "system")
IGNORE_INDEX = -100


def check_template(template: str) -> None:
    """Fail on a template name or format string that cannot render a prompt (config key 'template')."""
    if template in TEMPLATES:
        return
    if "{" not in template and "}" not in template:
        raise LoragridError(
            f"config key 'template': unknown template '{template}' (choose from {', '.join(TEMPLATES)}, "
            "or give a format string with an {instruction} placeholder)"
        )
    try:
        parsed = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(template)
                  if field is not None]
    except ValueError as error:
        raise LoragridError(f"config key 'template': {template!r} is not a valid format string: {error}") from None
    # A format spec or conversion would pad, cut or repr() the question, or reach its attributes.
    shaped = [field for field, spec, conversion in parsed if spec or conversion]
    if shaped:
        raise LoragridError(
            f"config key 'template': the placeholder {{{shaped[0]}}} in {template!r} carries a format spec or "
            "conversion (':' or '!'); placeholders take the text as it is: write {instruction}"
        )
    fields = [field for field, _, _ in parsed]
    unknown = sorted({field for field in fields if field not in PLACEHOLDERS})
    if unknown:
        raise LoragridError(
            f"config key 'template': unknown placeholder(s) {{{'}, {'.join(unknown)}}} in {template!r} "
            f"(allowed: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}; write {{{{ }}}} for a literal brace)"
        )
    if "instruction" not in fields:
        raise LoragridError(
            f"config key 'template': the custom template {template!r} has no {{instruction}} placeholder, "
            "so the question would never reach the model"
        )


def _with_input(message: dict) -> dict:
    """A user message for templates without an Input section: the input follows the instruction."""
    content = message["content"] + ("\n\n" + message["input"] if message.get("input") else "")
    return {"role": message["role"], "content": content}


def question_text(record: dict) -> str:
    """A prepared record's last question as the model reads it, with its input (alpaca's context field) after it:
    the question the report shows beside the answers."""
    return _with_input(record["messages"][-2])["content"]


def _split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


def _string_prompt(template: str, message: dict, system: str | None) -> str:
    if template in STRING_TEMPLATES:
        variants = STRING_TEMPLATES[template]
        if message.get("input") and "prompt_input" in variants:
            text = variants["prompt_input"].format(instruction=message["content"], input=message["input"])
        else:
            text = variants["prompt"].format(instruction=_with_input(message)["content"])
        return f"{system}\n\n{text}" if system else text
    fields = {field for _, field, _, _ in string.Formatter().parse(template) if field}
    instruction = message["content"] if "input" in fields else _with_input(message)["content"]
    text = template.format(instruction=instruction, input=message.get("input") or "", system=system or "")
    # A custom template without {system} still keeps the system prompt: in front, as the named ones do.
    return f"{system}\n\n{text}" if system and "system" not in fields else text


class TemplateRefused(LoragridError):
    """The model's chat template raised on a conversation (Gemma's and Mistral's take no system message)."""


def _chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template([_with_input(m) for m in messages],
                                             add_generation_prompt=add_generation_prompt, tokenize=False)
    except TemplateError as error:  # the template's own raise_exception(...)
        raise TemplateRefused(f"config key 'template': the model's chat template refuses this conversation ({error}); "
                              "change such records or choose another template") from None


@contextlib.contextmanager
def naming(record: dict):
    """A refusal of the chat template, named by the record's file and line (its id)."""
    try:
        yield
    except TemplateRefused as error:
        raise LoragridError(f"{record['id']}: {error}") from None


def record_token_ids(tokenizer, template: str, record: dict, whole: bool = False) -> list[int]:
    """conversation_token_ids of a prepared record: the prompt for its last answer, or (`whole`) all of it."""
    with naming(record):
        return conversation_token_ids(tokenizer, template, record["messages"] if whole else record["messages"][:-1])


def _require_chat_template(tokenizer) -> None:
    if not tokenizer.chat_template:
        raise LoragridError("config key 'template': the model has no chat template; choose another template "
                            f"({', '.join(TEMPLATES[1:])} or a format string)")


def _answer_span(prompt: str, answered: str, content: str) -> tuple[str, str] | None:
    """The answer as the template writes it after `prompt` in `answered`, and the text after it; None when
    `answered` does not continue `prompt` with the answer. Whitespace the template writes before an answer it strips
    (Llama-2's ' ' after [/INST]; Llama-2 and Gemma strip answers) belongs to the answer: "[/INST] Paris" is
    tokenized "[/INST]", "▁Paris", and the model is to write the "▁"."""
    if not answered.startswith(prompt):
        return None
    rest = answered[len(prompt):]
    if rest.startswith(content):
        return content, rest[len(content):]
    body = content.strip()
    gap = rest[: len(rest) - len(rest.lstrip())]
    if body and rest[len(gap):].startswith(body):
        return gap + body, rest[len(gap) + len(body):]
    return None


def _end_piece(tokenizer, tail: str) -> tuple[str, bool]:
    """The text that ends an answer (see _turn_end) and whether the template wrote it there, with the whitespace it
    writes before it (Llama-2's ' </s>'): the model learns to end as the template does, and the next prompt starts
    after it."""
    body = tail.lstrip()
    end = _turn_end(tokenizer, body)
    if body.startswith(end):
        return tail[: len(tail) - len(body)] + end, True
    return end, False


def _chat_segments(tokenizer, messages: list[dict], add_eos_token: bool) -> list[tuple[str, bool]]:
    """Cut the chat template's rendering into (text, is_answer) pieces, turn by turn.

    Each assistant turn is rendered as the template's prompt up to it, then the answer as the template writes it,
    then (with add_eos_token) the token that ends it, labelled with the answer: the special token the template
    writes right after an answer, so it is not repeated in the next prompt, else EOS.
    """
    _require_chat_template(tokenizer)
    segments, covered = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _chat(tokenizer, messages[:index], add_generation_prompt=True)
        answered = _chat(tokenizer, messages[: index + 1], add_generation_prompt=False)
        span = _answer_span(prompt, answered, message["content"]) if prompt.startswith(covered) else None
        if span is None:
            raise LoragridError(
                "config key 'template': the model's chat template does not render a conversation turn by turn "
                "(a later turn rewrites earlier text), so answer tokens cannot be told apart; choose another template"
            )
        segments += [(prompt[len(covered):], False), (span[0], True)]
        covered = prompt + span[0]
        if add_eos_token:
            end, written = _end_piece(tokenizer, span[1])
            segments.append((end, True))
            covered += end if written else ""
    if not messages or messages[-1]["role"] != "assistant":
        prompt = _chat(tokenizer, messages, add_generation_prompt=True)
        segments.append((prompt[len(covered):], False))
    return segments


def _turn_end(tokenizer, tail: str) -> str:
    """The special token a chat template writes right after an answer (<|im_end|>; Gemma's <end_of_turn> and
    Phi-3's <|end|>, which are not their tokenizers' EOS), else EOS: what the model must learn to end with."""
    added = {str(token) for token in tokenizer.added_tokens_decoder.values() if token.special}
    specials = set(tokenizer.all_special_tokens) | added
    # BOS opens the next turn in some templates (SmolLM2's <|im_start|>): it starts a turn, it does not end one.
    specials -= {tokenizer.bos_token, tokenizer.unk_token, None, ""}
    return next((token for token in sorted(specials, key=len, reverse=True) if tail.startswith(token)),
                tokenizer.eos_token)


def answer_end_ids(tokenizer, template: str) -> list[int]:
    """The ids that end an answer under this template, EOS first: generation stops at any of them."""
    ids = [tokenizer.eos_token_id]
    if template == "chat" and tokenizer.chat_template:
        probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]
        prompt = _chat(tokenizer, probe[:1], add_generation_prompt=True)
        span = _answer_span(prompt, _chat(tokenizer, probe, add_generation_prompt=False), "!")
        if span:
            end, _ = _end_piece(tokenizer, span[1])
            ids.append(tokenizer.convert_tokens_to_ids(end.lstrip()))
    return list(dict.fromkeys(id for id in ids if id is not None))


def segments(tokenizer, template: str, messages: list[dict], add_eos_token: bool = True) -> list[tuple[str, bool]]:
    """The conversation as (text, is_answer) pieces; a conversation ending with a user turn ends with its prompt."""
    if template == "chat":
        return _chat_segments(tokenizer, messages, add_eos_token)
    check_template(template)
    system, turns = _split_system(messages)
    pieces = []
    for message in turns:
        if message["role"] == "user":
            pieces.append((_string_prompt(template, message, system if not pieces else None), False))
        else:
            pieces.append((message["content"], True))
    return pieces


def render_prompt(tokenizer, template: str, messages: list[dict]) -> str:
    """The text the model sees before its answer; `messages` ends with the user's turn."""
    if template == "chat":
        _require_chat_template(tokenizer)
        return _chat(tokenizer, messages, add_generation_prompt=True)
    eos = tokenizer.eos_token or ""
    return "".join(text + (eos if is_answer else "") for text, is_answer in segments(tokenizer, template, messages))


# How much of the text before a piece is tokenized with it (see _continuation): enough for any token to end in it.
CONTEXT_CHARS = 256


def _anchor(tokenizer) -> str | None:
    """A special token that cuts the text in front of a piece as the tokenizer's own special tokens do, without
    taking the whitespace next to it (lstrip/rstrip): EOS where it can, so no dummy prefix starts the piece."""
    tokens = [token for token in tokenizer.added_tokens_decoder.values()
              if token.special and not token.lstrip and not token.rstrip]
    tokens.sort(key=lambda token: str(token) != tokenizer.eos_token)
    return str(tokens[0]) if tokens else None


def _ids_after(tokenizer, context: str, text: str) -> list[int] | None:
    """The ids that tokenizing `context + text` at once gives beyond the context's; None where a token spans both."""
    before = tokenizer(context, add_special_tokens=False)["input_ids"]
    both = tokenizer(context + text, add_special_tokens=False)["input_ids"]
    return both[len(before):] if both[: len(before)] == before else None


def _after_break(tokenizer, text: str) -> list[int]:
    """Ids of `text` where a token ends right before it, as after a line break: a SentencePiece tokenizer (Llama,
    Mistral, Phi-3) puts a dummy prefix '▁' in front of a text's start, so `text` on its own would begin '▁Paris'
    where the whole text has 'Paris'. Byte-level BPE and Gemma add none: there this is `text` on its own."""
    for context in ("\n", _anchor(tokenizer)):  # a special token where the text's own line break would merge
        ids = _ids_after(tokenizer, context, text) if context else None
        if ids is not None:
            return ids
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _continuation(tokenizer, context: str, text: str) -> list[int]:
    """Ids of `text` where it follows `context`, as the whole conversation is tokenized at generation by other
    tools (Ollama, vLLM). Where a token would span both (a template ending in a space: ' Paris'), the piece is
    tokenized after a cut instead, for the prompt must be the same ids with or without the answer after it: '▁'
    (or 'Ġ'), then 'Paris'."""
    ids = _ids_after(tokenizer, context, text) if context else None
    return ids if ids is not None else _after_break(tokenizer, text)


def _encode(tokenizer, template: str, messages: list[dict], add_eos_token: bool) -> tuple[list[int], list[bool]]:
    ids, is_answer, context = [], [], ""
    for position, (text, answer) in enumerate(segments(tokenizer, template, messages, add_eos_token)):
        if position == 0:
            # A chat template writes its own special tokens; other templates get the tokenizer's (e.g. BOS) once.
            piece = tokenizer(text, add_special_tokens=template != "chat")["input_ids"]
        else:
            piece = _continuation(tokenizer, context, text)
        context = (context + text)[-CONTEXT_CHARS:]
        if answer and add_eos_token and template != "chat":  # a chat conversation has its own (_chat_segments)
            piece = piece + [tokenizer.eos_token_id]
            context += tokenizer.eos_token or ""
        ids += piece
        is_answer += [answer] * len(piece)
    return ids, is_answer


def conversation_token_ids(tokenizer, template: str, messages: list[dict]) -> list[int]:
    """Token ids of `messages` as training renders them, uncut (answers with their EOS): for messages that end with
    the user's turn, the prompt for the answer after it; for a whole conversation, tokenize_example's ids."""
    return _encode(tokenizer, template, messages, add_eos_token=True)[0]


def tokenize_example(tokenizer, template: str, messages: list[dict], cutoff_len: int,
                     train_on_inputs: bool = False, add_eos_token: bool = True) -> dict | None:
    """input_ids and labels for one conversation that ends with an assistant turn.

    Labels cover the assistant turns (each with its EOS) unless `train_on_inputs`; system
    prompts and user turns are context only. Returns None when `cutoff_len` would cut away
    every answer token, so that no record is trained on without an answer.
    """
    ids, is_answer = _encode(tokenizer, template, messages, add_eos_token)
    if not any(is_answer[:cutoff_len]):
        return None
    truncated = len(ids) > cutoff_len
    ids, is_answer = ids[:cutoff_len], is_answer[:cutoff_len]
    labels = ids.copy() if train_on_inputs else [t if a else IGNORE_INDEX for t, a in zip(ids, is_answer)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "truncated": truncated}


def tokenize_split(tokenizer, template: str, records: list[dict], cutoff_len: int,
                   train_on_inputs: bool = False, add_eos_token: bool = True):
    """Tokenize prepared records; returns (examples, what cutoff_len did).

    Records whose answer `cutoff_len` would cut away entirely are dropped and listed by id
    (the id names the file and line); records whose answer is only shortened are counted.
    """
    examples, dropped, truncated = [], [], []
    # A bar in the job's log: tens of thousands of records (alpaca-cleaned) take a while to tokenize.
    for record in tqdm(records, desc="tokenize", unit="record", mininterval=2):
        with naming(record):
            example = tokenize_example(tokenizer, template, record["messages"], cutoff_len, train_on_inputs,
                                       add_eos_token)
        if example is None:
            dropped.append(record["id"])
            continue
        if example.pop("truncated"):
            truncated.append(record["id"])
        examples.append(example)
    return examples, {"dropped_prompt_too_long": dropped, "truncated": len(truncated), "truncated_ids": truncated}
