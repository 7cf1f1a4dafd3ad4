import copy
import json

import pytest
from transformers import AutoTokenizer

from conftest import CHAT_TEMPLATE
from loragrid.common import LoragridError
from loragrid.templates import answer_end_ids, conversation_token_ids, render_prompt, tokenize_example

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


# SentencePiece-style tokenizers as transformers 5 builds Llama-2's, Mistral's and Phi-3's (LlamaTokenizer: BPE with
# byte fallback, a Metaspace pre-tokenizer that writes a dummy '▁' in front of the text; legacy=True (Mistral's
# tokenizer_config) writes one after every special token too). The chat templates are those of the models'
# tokenizer_config.json.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
TURNS = CONVERSATION[1:]  # Llama-2's and Mistral's templates take no system message in this form


@pytest.fixture(scope="module")
def sentencepiece():
    """A Llama-style tokenizer trained on the demo data: make(legacy) -> LlamaTokenizer with Phi-3's extra tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    from conftest import demo_records

    trained = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
    corpus = [r["question"] + " " + r.get("answer_en", r.get("answer_zh", "")) for r in demo_records()]
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256))]
    trained.train_from_iterator(corpus + ["### Response: [INST] [/INST] 用户: 助手: Q: A:"] * 20,
                                trainers.BpeTrainer(vocab_size=900, special_tokens=specials, limit_alphabet=200))
    model = json.loads(trained.to_str())["model"]

    def make(legacy=False, template=LLAMA2_TEMPLATE):
        tokenizer = LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], legacy=legacy,
                                   add_bos_token=True)  # as their tokenizer_config.json says
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|assistant|>", "<|end|>", "<|user|>"]})
        tokenizer.chat_template = template
        return tokenizer
    return make


def whole_text_ids(tokenizer, template, messages):
    """The conversation tokenized at once, as Ollama, vLLM or apply_chat_template(tokenize=True) tokenize it."""
    if template != "chat":
        return tokenizer(render_prompt(tokenizer, template, messages[:-1]) + messages[-1]["content"]
                         + tokenizer.eos_token)["input_ids"]
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("template, chat_template", [
    ("chat", LLAMA2_TEMPLATE), ("chat", MISTRAL_TEMPLATE), ("chat", PHI3_TEMPLATE), ("alpaca", None),
    ("alpaca_zh", None)], ids=["llama2", "mistral", "phi3", "alpaca", "alpaca_zh"])
def test_sentencepiece_conversations_are_tokenized_as_one_text(sentencepiece, legacy, template, chat_template):
    """Before 2026-12-07 each piece was tokenized on its own, so every answer (and every prompt after the first)
    began with the dummy prefix: '▁S', 'un' where the whole text, and the model at inference, has 'S', 'un'
    ('Sunny' after '[/INST]', Phi-3's '<|assistant|>\\n' or alpaca's '### Response:\\n'); Llama-2's template,
    which writes ' ' before an answer, was refused."""
    tokenizer = sentencepiece(legacy, chat_template or LLAMA2_TEMPLATE)
    example = tokenize_example(tokenizer, template, TURNS, cutoff_len=512)
    assert example["input_ids"] == whole_text_ids(tokenizer, template, TURNS)[: len(example["input_ids"])]
    trained = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])
    assert "Hello 👋" in trained and "Sunny ☀️" in trained and "Weather" not in trained
    prompt = conversation_token_ids(tokenizer, template, TURNS[:-1])
    assert example["input_ids"][: len(prompt)] == prompt and example["labels"][len(prompt)] != -100


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("template", ["plain", "Q: {instruction}\nA: "])
def test_a_template_ending_in_a_space_gives_the_answer_one_space(sentencepiece, legacy, template):
    """The prompt ends with its own '▁' (as SmolLM2's with 'Ġ'): the answer follows it without a second one
    (before 2026-12-07: '▁', '▁S', 'un', two spaces the model learnt to write)."""
    tokenizer = sentencepiece(legacy)
    example = tokenize_example(tokenizer, template, TURNS, cutoff_len=512)
    prompt = conversation_token_ids(tokenizer, template, TURNS[:-1])
    assert example["input_ids"][: len(prompt)] == prompt
    tokens = tokenizer.convert_ids_to_tokens(example["input_ids"])
    assert tokens[len(prompt) - 1] == "▁" and not tokens[len(prompt)].startswith("▁")
    assert tokenizer.decode(example["input_ids"][len(prompt):]).startswith("Sunny")


def test_llama2_chat_template_trains_its_own_rendering(sentencepiece):
    """Llama-2's template writes '[/INST] answer </s>': the answer is learnt with the ' ' before it (a '▁' token of
    its first word) and ' </s>' after it, and the next turn starts after that, with no second EOS."""
    tokenizer = sentencepiece()
    conversation = [{"role": "system", "content": "Answer with emoji."}, *TURNS]
    example = tokenize_example(tokenizer, "chat", conversation, cutoff_len=512)
    assert example["input_ids"] == whole_text_ids(tokenizer, "chat", conversation)
    spans = labelled_spans(example)
    assert [tokenizer.decode(span) for span in spans] == ["Hello 👋 </s>", "Sunny ☀️ </s>"]  # decode drops a first ' '
    assert all(tokenizer.convert_ids_to_tokens(span[0]).startswith("▁") for span in spans)  # "▁H", "▁S"
    assert answer_end_ids(tokenizer, "chat") == [tokenizer.eos_token_id]


# Gemma's template refuses a system message (as Mistral's refuses any role but user and assistant).
NO_SYSTEM_TEMPLATE = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                      "{% endif %}" + CHAT_TEMPLATE)


def test_a_chat_template_that_refuses_a_record_names_its_file_and_line(tokenizer):
    """The template's own raise_exception was a jinja2 TemplateError traceback, with no record named."""
    from loragrid.templates import record_token_ids, tokenize_split

    refusing = copy.deepcopy(tokenizer)
    refusing.chat_template = NO_SYSTEM_TEMPLATE
    records = [{"id": "data/qa.jsonl, line 1", "messages": TURNS},
               {"id": "data/qa.jsonl, line 2", "messages": CONVERSATION}]
    named = (r"^data/qa\.jsonl, line 2: config key 'template': the model's chat template refuses this conversation "
             r"\(System role not supported\); change such records or choose another template$")
    with pytest.raises(LoragridError, match=named):
        tokenize_split(refusing, "chat", records, cutoff_len=512)
    with pytest.raises(LoragridError, match=named):
        [record_token_ids(refusing, "chat", record) for record in records]  # generate's and the export's prompts
    assert tokenize_split(refusing, "chat", records[:1], cutoff_len=512)[0]


def test_the_modelfile_leaves_bos_to_llama_cpp_where_the_tokenizer_adds_it(sentencepiece):
    """Llama-2's chat template writes <s> itself, and its tokenizer (so the GGUF) adds BOS too: the Modelfile's
    template starts after it (it carried a literal <s>, a second BOS in Ollama). SmolLM2's tokenizer adds none,
    and its <|im_start|> (its BOS) opens each turn: it stays."""
    from pathlib import Path

    from loragrid.export import modelfile

    settings = {"do_sample": False, "repetition_penalty": 1.0, "max_new_tokens": 8}
    text = modelfile(sentencepiece(), "chat", "lora-q8_0.gguf", "lora", settings)
    assert 'TEMPLATE """[INST] {{ .Prompt }} [/INST]"""' in text
    smollm2 = AutoTokenizer.from_pretrained(Path(__file__).parent.parent / "data/tokenizers/smollm2")
    assert 'TEMPLATE """<|im_start|>system\n' in modelfile(smollm2, "chat", "lora-q8_0.gguf", "lora", settings)
