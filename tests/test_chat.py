"""`python -m loragrid`: the chat with a finished run (through a real pseudo-terminal) and the command list."""

from __future__ import annotations

import os
import subprocess
import sys

import pexpect

from conftest import CUSTOM_TEMPLATE
from loragrid.__main__ import parser
from loragrid.common import read_jsonl


def loragrid(workdir, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loragrid", *args], cwd=workdir, capture_output=True, text=True,
                          timeout=300)


def test_help_lists_every_subcommand(tmp_path):
    from conftest import REPO

    result = loragrid(REPO, "--help")
    assert result.returncode == 0
    commands = parser()._subparsers._group_actions[0].choices
    assert set(commands) == {"chat", "runs", "memory"}
    for name in commands:
        assert name in result.stdout
    chat_help = loragrid(REPO, "chat", "--help").stdout
    for option in ("--run", "--merged", "--load-in-4bit", "--question"):
        assert option in chat_help


def test_one_shot_answer_matches_the_workflow_generation(tiny_workflow):
    """The merged run, asked one held-out question, answers as the generate stage did: same template and settings."""
    workdir, _, _ = tiny_workflow
    generated = read_jsonl(workdir / "results/tiny--tiny/generations/lora.jsonl")[0]
    result = loragrid(workdir, "chat", "--run", "lora", "--merged", "--question", generated["question"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == generated["answer"]


def test_one_shot_on_a_4bit_base_with_the_adapter(tiny_workflow):
    workdir, _, _ = tiny_workflow
    question = read_jsonl(workdir / "results/tiny--tiny/generations/qlora4.jsonl")[0]["question"]
    result = loragrid(workdir, "chat", "--run", "qlora4", "--load-in-4bit", "--question", question)
    assert result.returncode == 0, result.stderr[-2000:]


def test_interactive_chat_in_a_terminal(tiny_workflow):
    workdir, _, _ = tiny_workflow
    questions = [g["question"] for g in read_jsonl(workdir / "results/tiny--tiny/generations/lora.jsonl")[:2]]
    session = pexpect.spawn(sys.executable, ["-m", "loragrid", "chat", "--run", "lora"], cwd=str(workdir),
                            encoding="utf-8", timeout=180, dimensions=(40, 200))
    # The run's template and generation settings (tiny config: max_new_tokens 4, greedy), the adapter on its base.
    session.expect_exact(f"lora: adapter on resources/models/tiny, template {CUSTOM_TEMPLATE!r}, "
                         "max_new_tokens 4, greedy")
    for question in questions:
        session.expect_exact("you> ")
        session.sendline(question)
        session.expect_exact("lora> ")
    session.expect_exact("you> ")
    session.sendline("exit")
    session.expect(pexpect.EOF)
    session.close()
    assert session.exitstatus == 0

    # Ctrl-D ends the chat too.
    session = pexpect.spawn(sys.executable, ["-m", "loragrid", "chat", "--run", "base"], cwd=str(workdir),
                            encoding="utf-8", timeout=180)
    session.expect_exact("you> ")
    session.sendeof()
    session.expect(pexpect.EOF)
    session.close()
    assert session.exitstatus == 0


def test_unknown_run_names_the_finished_ones(tiny_workflow):
    workdir, _, _ = tiny_workflow
    result = loragrid(workdir, "chat", "--run", "nope", "--question", "hi")
    assert result.returncode == 2
    assert "run 'nope'" in result.stderr and "base, full, lora, qlora4, qlora8" in result.stderr
    merged_full = loragrid(workdir, "chat", "--run", "full", "--merged", "--question", "hi")
    assert merged_full.returncode == 2 and "no merged adapter" in merged_full.stderr


def test_runs_lists_what_a_config_resolves_to(tiny_workflow, tmp_path):
    workdir, config, _ = tiny_workflow
    more = tmp_path / "more.yaml"
    more.write_text("grid:\n  method: [full, lora, qlora4, qlora8]\n  lora_r: [4, 8]\n")
    result = loragrid(workdir, "runs", "--configfile", str(config), str(more))
    assert result.returncode == 0, result.stderr[-2000:]
    header, *lines = result.stdout.splitlines()
    assert header == "experiment tiny--tiny (results/tiny--tiny)"
    status = {line.split()[0]: line.split(maxsplit=2)[2] for line in lines}
    assert status == {"full": "evaluated", "lora": "evaluated", "qlora4": "evaluated", "qlora8": "evaluated",
                      "lora-r8": "not trained", "qlora4-r8": "not trained", "qlora8-r8": "not trained"}
    # Another learning rate for full: the same run name with other settings.
    changed = loragrid(workdir, "runs", "--configfile", str(config), "--config",
                       "methods={full: {learning_rate: 0.001}}")
    assert changed.stdout.splitlines()[1].split(maxsplit=2) == [
        "full", "full", "trained; snakemake trains it again (params changed)"]
    assert changed.stdout.splitlines()[2].split(maxsplit=2) == ["lora", "lora", "evaluated"]
    # Another split: no run setting changed, yet every run trains on the new split (as a dry run would plan).
    resplit = loragrid(workdir, "runs", "--configfile", str(config), "--config", "split={seed: 7}")
    assert {line.split(maxsplit=2)[2] for line in resplit.stdout.splitlines()[1:]} == {
        "trained; snakemake trains it again (an input or its code changed: `snakemake -n` says which)"}, resplit.stdout
    # A new template is a setting of every training job; config files are named from where the command runs.
    (tmp_path / "plain.yaml").write_text("template: plain\n")
    retemplated = subprocess.run(
        [sys.executable, "-m", "loragrid", "runs", "--directory", str(workdir), "--configfile", str(config),
         "plain.yaml"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(workdir)}, capture_output=True, text=True)
    assert {line.split(maxsplit=2)[2] for line in retemplated.stdout.splitlines()[1:]} == {
        "trained; snakemake trains it again (params changed)"}, retemplated.stdout + retemplated.stderr
    # The default config is another experiment (another model and dataset): nothing of it is trained here.
    default = loragrid(workdir, "runs")
    assert default.stdout.splitlines()[0].startswith("experiment smollm2-135m-instruct--emoji_qa")
    assert default.stdout.splitlines()[1].split(maxsplit=2) == ["full", "full", "not trained"]
    more.write_text("grid:\n  method: [lora, qlora3]\n")
    bad = loragrid(workdir, "runs", "--configfile", str(config), str(more))
    assert bad.returncode == 2 and "qlora3" in bad.stderr


def test_a_system_prompt_goes_before_each_question(tiny_workflow, monkeypatch):
    """`chat --system` asks as a record's `system` field trained: the system message, then the question."""
    from loragrid.__main__ import main
    from loragrid.chat import Chat
    from loragrid.templates import conversation_token_ids

    workdir, _, _ = tiny_workflow
    question = read_jsonl(workdir / "results/tiny--tiny/generations/lora.jsonl")[0]["question"]
    system = "Answer in French."
    plain, told = Chat(workdir, "lora", merged=True), Chat(workdir, "lora", merged=True, system=system)
    asked = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    assert told.prompt_ids(question) == conversation_token_ids(told.tokenizer, told.template, asked)
    assert system in told.tokenizer.decode(told.prompt_ids(question)) and system not in plain.description
    assert told.description.endswith(f", system prompt {system!r}")
    # The command line's --system reaches the prompt (the tiny model's 4-token answers are empty either way).
    prompts = []
    monkeypatch.setattr(Chat, "answer", lambda chat, asked, stream=False: prompts.append(chat.prompt_ids(asked)) or "")
    assert main(["chat", "--directory", str(workdir), "--run", "lora", "--merged", "--question", question,
                 "--system", system]) == 0
    assert prompts == [told.prompt_ids(question)]
