import copy

import pytest
from transformers import AutoTokenizer

from loragrid.common import LoragridError
from loragrid.templates import conversation_token_ids, render_prompt, tokenize_example

MESSAGES = [{"role": "user", "content": "Why is the sky blue?"},
            {"role": "assistant", "content": "Because of Rayleigh scattering 🌈☀️"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_chat_template_prompt(tokenizer):
    prompt = render_prompt(tokenizer, "chat", MESSAGES[:1])
    assert prompt.endswith("<|im_start|>assistant\n") and "Why is the sky blue?" in prompt


def test_plain_template_prompt(tokenizer):
    assert render_prompt(tokenizer, "plain", MESSAGES[:1]) == "用户: Why is the sky blue? 助手: "


def test_unknown_template(tokenizer):
    with pytest.raises(LoragridError, match="template"):
        render_prompt(tokenizer, "vicuna", MESSAGES[:1])


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_labels_cover_only_the_answer_and_eos(tokenizer, template):
    example = tokenize_example(tokenizer, template, MESSAGES, cutoff_len=256)
    labelled = [t for t in example["labels"] if t != -100]
    assert labelled[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(labelled[:-1]) == MESSAGES[1]["content"]
    first = example["labels"].index(labelled[0])
    assert example["input_ids"][first:] == labelled
    assert not example["truncated"]


def test_train_on_inputs_and_no_eos(tokenizer):
    example = tokenize_example(tokenizer, "chat", MESSAGES, cutoff_len=256, train_on_inputs=True, add_eos_token=False)
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][-1] != tokenizer.eos_token_id


def test_cutoff_truncates_the_answer_and_drops_hopeless_prompts(tokenizer):
    full = tokenize_example(tokenizer, "chat", MESSAGES, cutoff_len=256)
    prompt_length = full["labels"].count(-100)
    cut = tokenize_example(tokenizer, "chat", MESSAGES, cutoff_len=prompt_length + 2)
    assert cut["truncated"] and len(cut["input_ids"]) == prompt_length + 2
    assert tokenize_example(tokenizer, "chat", MESSAGES, cutoff_len=prompt_length) is None


CONVERSATION = [
    {"role": "system", "content": "Answer with emoji."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello 👋"},
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": "Sunny ☀️"},
]


def labelled_spans(example):
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label == -100 and current:
            spans.append(current)
            current = []
        elif label != -100:
            current.append(token)
    return spans + ([current] if current else [])


@pytest.mark.parametrize("template", ["chat", "plain", "alpaca", "alpaca_zh", "Q: {instruction}\nA: "])
def test_multi_turn_loss_on_assistant_turns_only(tokenizer, template):
    example = tokenize_example(tokenizer, template, CONVERSATION, cutoff_len=512)
    spans = labelled_spans(example)
    assert [tokenizer.decode(span) for span in spans] == ["Hello 👋<|im_end|>", "Sunny ☀️<|im_end|>"]
    text = tokenizer.decode(example["input_ids"])
    assert "Answer with emoji." in text and "Hi there" in text and "Weather?" in text  # system prompt kept


def test_chat_tokens_are_the_chat_templates_rendering(tokenizer):
    example = tokenize_example(tokenizer, "chat", CONVERSATION, cutoff_len=512)
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    # Everything up to the last answer's end-of-turn (EOS); what the template writes after it is never learnt.
    assert tokenizer.decode(example["input_ids"]) == rendered[: rendered.rindex("<|im_end|>") + len("<|im_end|>")]


@pytest.mark.parametrize("template", ["chat", "plain", "alpaca", "alpaca_zh", "{system}|{instruction}|{input}|"])
def test_generation_prompt_is_the_training_prefix(tokenizer, template):
    """The same template at training and generation: the prompt is exactly what preceded the answer."""
    example = tokenize_example(tokenizer, template, CONVERSATION, cutoff_len=512)
    prompt = conversation_token_ids(tokenizer, template, CONVERSATION[:-1])
    assert example["input_ids"][: len(prompt)] == prompt
    assert example["labels"][len(prompt) - 1] == -100 and example["labels"][len(prompt)] != -100


def test_alpaca_templates_with_and_without_input(tokenizer):
    with_input = [{"role": "user", "content": "Translate", "input": "chat"}]
    assert render_prompt(tokenizer, "alpaca", with_input).endswith(
        "### Instruction:\nTranslate\n\n### Input:\nchat\n\n### Response:\n")
    assert "### Input" not in render_prompt(tokenizer, "alpaca", [{"role": "user", "content": "Translate"}])
    assert (render_prompt(tokenizer, "alpaca_zh", with_input)
            == "### 指令:\nTranslate\n\n### 输入:\nchat\n\n### 回答:\n")
    # Templates without an Input section put the input after the instruction; chat too.
    assert render_prompt(tokenizer, "plain", with_input) == "用户: Translate\n\nchat 助手: "
    assert "Translate\n\nchat<|im_end|>" in render_prompt(tokenizer, "chat", with_input)


def test_custom_template_and_system_prompt(tokenizer):
    asked = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]
    assert render_prompt(tokenizer, "[{system}] Q: {instruction}\nA: ", asked) == "[Be brief.] Q: Why?\nA: "
    assert render_prompt(tokenizer, "Q: {instruction}\nA: ", asked) == "Be brief.\n\nQ: Why?\nA: "
    assert render_prompt(tokenizer, "alpaca_zh", asked).startswith("Be brief.\n\n### 指令:\nWhy?")


@pytest.mark.parametrize("template, message", [
    ("vicuna", "unknown template 'vicuna'"),
    ("Q: {question}", r"unknown placeholder\(s\) \{question\}"),
    ("Q: {input}", r"has no \{instruction\} placeholder"),
    ("Q: {instruction", "not a valid format string"),
    ("Q: {instruction:>400}", r"placeholder \{instruction\} .* carries a format spec"),
    ("Q: {instruction!r}", r"placeholder \{instruction\} .* carries a format spec or conversion"),
    ("Q: {instruction.__class__}", r"unknown placeholder\(s\) \{instruction\.__class__\}"),
    ("Q: {instruction[0]}", r"unknown placeholder\(s\) \{instruction\[0\]\}"),
])
def test_bad_templates(tokenizer, template, message):
    with pytest.raises(LoragridError, match=rf"config key 'template': .*{message}"):
        render_prompt(tokenizer, template, MESSAGES[:1])


def test_a_model_without_chat_template(tokenizer):
    bare = copy.copy(tokenizer)
    bare.chat_template = None
    with pytest.raises(LoragridError, match="the model has no chat template; choose another template"):
        tokenize_example(bare, "chat", MESSAGES, cutoff_len=64)


def test_a_chat_template_that_ends_turns_with_another_token_than_eos_trains_that_token():
    """Qwen2.5's base tokenizer (EOS <|endoftext|>, turns end with <|im_end|>), as Gemma's <end_of_turn> and Phi-3's
    <|end|>: before 2026-12-07 the answers were trained to end with EOS and the template's <|im_end|> slid into the
    next, unlabelled prompt."""
    from pathlib import Path

    from loragrid.templates import answer_end_ids

    qwen_base = AutoTokenizer.from_pretrained(Path(__file__).parent.parent / "data/tokenizers/smollm2",
                                              eos_token="<|endoftext|>")
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    example = tokenize_example(qwen_base, "chat", conversation, cutoff_len=512)
    trained = [token for token, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert qwen_base.decode(trained) == "Hello<|im_end|>4<|im_end|>"
    whole = qwen_base.apply_chat_template(conversation, tokenize=False)
    assert qwen_base.decode(example["input_ids"]) == whole.removesuffix("\n")  # the template's own rendering
    end_of_turn = qwen_base.convert_tokens_to_ids("<|im_end|>")
    assert answer_end_ids(qwen_base, "chat") == [qwen_base.eos_token_id, end_of_turn]
    assert answer_end_ids(qwen_base, "plain") == [qwen_base.eos_token_id]
