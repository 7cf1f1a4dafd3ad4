"""envs/*.yaml (one conda environment per stage) must pin what requirements.txt pins."""

import re

import yaml

from conftest import REPO


def pinned_requirements() -> dict[str, str]:
    """requirements.txt's pins, and requirements-test.txt's (the GGUF export's llama-cpp-python)."""
    pins = {}
    lines = [*(REPO / "requirements.txt").read_text().splitlines(),
             *(REPO / "requirements-test.txt").read_text().splitlines()]
    for line in lines:
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_every_stage_has_an_environment_pinned_like_requirements():
    pins = pinned_requirements()
    assert pins["torch"] == "2.13.0"
    environments = sorted((REPO / "envs").glob("*.yaml"))
    stages = {"fetch", "data", "train", "merge", "generate", "evaluate", "benchmark", "report", "export"}
    assert {p.stem for p in environments} == stages
    for path in environments:
        env = yaml.safe_load(path.read_text())
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
        for entry in pip:
            name, version = entry.split("==")
            assert pins.get(name.lower()) == version, f"{path.name}: {entry} vs requirements.txt"


def test_every_rule_uses_an_existing_environment():
    for rules_file in (REPO / "rules").glob("*.smk"):
        for env in re.findall(r'conda:\s*\n\s*"\.\./(envs/[^"]+)"', rules_file.read_text()):
            assert (REPO / env).exists(), f"{rules_file.name} names {env}"


def test_conda_deployment_is_documented():
    readme = (REPO / "README.md").read_text()
    assert "--sdm conda" in readme and "envs/*.yaml" in readme
