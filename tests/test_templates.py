import pytest
from transformers import AutoTokenizer

from loragrid.common import LoragridError
from loragrid.templates import render_prompt, tokenize_example

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
