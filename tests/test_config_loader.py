"""One config loader for the Snakefile and the CLI: grids that replace, runs that add, the seeds' keys,
and `python -m loragrid runs` printing exactly the runs a real `snakemake -n` plans."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from loragrid.common import LoragridError
from loragrid.config import checked_runs, load_config, load_schema

LINKED_GRID = {"_": [{"method": "lora", "learning_rate": 0.0002}, {"method": "qlora4", "learning_rate": 0.001}],
               "lora_r": [16, 64]}
LINKED_RUNS = ["lora-lr2e-4", "lora-r64-lr2e-4", "qlora4-lr1e-3", "qlora4-r64-lr1e-3"]


def runs_of(tmp_path, layer: dict) -> list[str]:
    path = tmp_path / "layer.yaml"
    path.write_text(yaml.safe_dump(layer))
    return sorted(checked_runs(load_config([path]), workdir=REPO))


def planned_runs(*args) -> list[str]:
    """The runs a real `snakemake -n` plans in the checkout (its train jobs' run wildcards)."""
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "-n", "all", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # Any experiment: a dry run plans the jobs whose outputs are missing or stale, so plan into a
    # fresh experiment folder that no run has written.
    return sorted(set(re.findall(r"wildcards: run=(\S+)", result.stdout + result.stderr)))


def cli_runs(*args) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "loragrid", "runs", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return sorted(line.split()[0] for line in result.stdout.splitlines()[1:])


FRESH = "--config", "experiment=planned-by-a-test"  # an experiment no test writes: every job is planned


@pytest.mark.parametrize("name", sorted(path.name for path in (REPO / "config").glob("*.yaml")
                                        if path.name != "schema.yaml"))
def test_the_cli_lists_exactly_the_runs_snakemake_plans_for_each_shipped_config(name):
    files = [] if name == "config.yaml" else ["--configfile", f"config/{name}"]
    assert cli_runs(*files, *FRESH) == planned_runs(*files, *FRESH)


def test_the_linked_grid_example_plans_four_runs_by_file_and_by_command_line(tmp_path):
    example = tmp_path / "linked.yaml"
    example.write_text(yaml.safe_dump({"grid": LINKED_GRID}))
    by_file = planned_runs("--configfile", str(example), *FRESH)
    grid = ("grid={_: [{method: lora, learning_rate: 0.0002}, {method: qlora4, learning_rate: 0.001}], "
            "lora_r: [16, 64]}")
    by_command_line = planned_runs("--config", grid, "experiment=planned-by-a-test")
    assert by_file == by_command_line == LINKED_RUNS
    assert cli_runs("--configfile", str(example), *FRESH) == LINKED_RUNS
    assert cli_runs("--config", grid, "experiment=planned-by-a-test") == LINKED_RUNS


def test_a_grid_replaces_the_default_grid_and_runs_only_add(tmp_path):
    assert runs_of(tmp_path, {"grid": {"lora_r": [8]}}) == ["lora-r8"]
    assert runs_of(tmp_path, {"runs": {"big": {"method": "lora", "lora_r": 64}}}) == \
        ["big", "full", "lora", "qlora4", "qlora8"]
    # A later file's grid replaces an earlier one's too; other sections still merge key by key.
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump({"grid": {"method": ["full"]}, "training": {"lora_r": 4}}))
    second.write_text(yaml.safe_dump({"grid": {"lora_dropout": [0.1]}, "training": {"seed": 1}}))
    config = load_config([first, second])
    assert config["grid"] == {"lora_dropout": [0.1]}
    assert config["training"]["lora_r"] == 4 and config["training"]["seed"] == 1
    # An empty grid names no runs (it named the default run, 'lora', beside the named ones): a real snakemake
    # plans the named run only; with no named runs either there is nothing to train.
    named = tmp_path / "named.yaml"
    named.write_text(yaml.safe_dump({"grid": {}, "runs": {"mine": {"method": "qlora4", "lora_r": 8}}}))
    assert planned_runs("--configfile", str(named), *FRESH) == ["mine"]
    with pytest.raises(LoragridError, match="config keys 'grid' and 'runs' are both empty: there is nothing to"):
        runs_of(tmp_path, {"grid": {}})


def test_yaml_exponents_load_as_numbers_in_the_cli_as_in_snakemake(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("training:\n  learning_rate: 1e-4\ngrid:\n  learning_rate: [1e-4, 3e-4]\n")
    assert cli_runs("--configfile", str(path)) == ["lora", "lora-lr3e-4"]  # YAML reads 1e-4 as text


def test_target_module_lists_in_a_grid_get_safe_stable_names(tmp_path):
    grid = {"target_modules": ["all-linear", ["q_proj", "v_proj"], None]}
    assert runs_of(tmp_path, {"grid": grid}) == ["lora", "lora-tmq_proj.v_proj"]  # null is all-linear: "lora"


def test_warmup_steps_turns_the_default_ratio_off_and_both_in_one_place_fail(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump({"training": {"warmup_steps": 10}, "grid": {"method": ["lora"]}}))
    [(name, settings)] = checked_runs(load_config([path]), workdir=REPO).items()
    assert name == "lora" and settings["warmup_steps"] == 10 and settings["warmup_ratio"] == 0.0
    assert runs_of(tmp_path, {"grid": {"warmup_steps": [10]}}) == ["lora-wsteps10"]  # no "warm0": it says the same
    path.write_text(yaml.safe_dump({"methods": {"lora": {"warmup_steps": 10, "warmup_ratio": 0.1}}}))
    with pytest.raises(LoragridError, match=r"config keys 'methods\.lora\.warmup_steps' and "
                                            r"'methods\.lora\.warmup_ratio' are both set"):
        checked_runs(load_config([path]), workdir=REPO)


def test_the_schema_defaults_are_the_default_configs_values():
    """One place for defaults: every key config.yaml sets has the same default in the schema."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    schema = load_schema()
    for section, values in config.items():
        spec = schema["properties"][section]
        for key, value in (values.items() if isinstance(values, dict) else []):
            default = spec.get("properties", {}).get(key, {}).get("default", value)
            assert default == value, f"{section}.{key}: config.yaml {value!r}, schema default {default!r}"


def test_the_docs_quote_the_default_config():
    """docs/config.md's first YAML block shows config.yaml's own values."""
    page = (REPO / "docs" / "config.md").read_text()
    quoted = yaml.safe_load(re.search(r"```yaml\n(.*?)```", page, re.S).group(1))
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())

    def leaves(mapping, prefix=""):
        for key, value in mapping.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    actual = dict(leaves(config))
    for key, value in leaves(quoted):
        assert actual.get(key) == value, f"docs/config.md quotes {key}: {value!r}, config.yaml has {actual.get(key)!r}"


def test_null_on_the_command_line_is_null():
    """`--config` hands nested values over as text: 'null' must become None where the schema allows it."""
    from snakemake.cli import parse_config

    config = load_config(command_line=parse_config(["training={target_modules: null, warmup_steps: null}"]))
    runs = checked_runs(config, workdir=REPO)
    assert runs["lora"]["target_modules"] == "all-linear" and runs["lora"]["warmup_steps"] is None


def test_a_benchmark_limit_per_task_on_the_command_line_is_a_number():
    """benchmarks.limit is a number, null or a mapping (a oneOf): a mapping's text values are typed too."""
    from snakemake.cli import parse_config

    limits = "benchmarks={limit: {loragrid_sense: 4, loragrid_hollow_lane: null}}"
    config = load_config(command_line=parse_config([limits]))
    checked_runs(config, workdir=REPO)
    assert config["benchmarks"]["limit"] == {"loragrid_sense": 4, "loragrid_hollow_lane": None}


def test_the_cli_names_a_missing_or_malformed_config_file(tmp_path, capsys):
    from loragrid.__main__ import main

    malformed = tmp_path / "bad.yaml"
    malformed.write_text("training: [1,\n")
    assert main(["runs", "--configfile", str(tmp_path / "none.yaml")]) == 2
    assert main(["runs", "--configfile", str(malformed)]) == 2
    errors = capsys.readouterr().err
    assert f"loragrid runs: config file {tmp_path / 'none.yaml'}: No such file or directory" in errors
    assert re.search(rf"loragrid runs: config file {re.escape(str(malformed))}: .* line 2, column 1", errors)


def test_every_setting_in_the_schema_has_a_description():
    """config/README.md and docs/development.md say the schema describes every key (ten run keys, most of
    split and generate had none): a setting is described, or its mapping is (per-type thresholds)."""
    schema = load_schema()

    def undescribed(node: dict, path: str, mapping_described: bool):
        for key, value in node.get("properties", {}).items():
            if "properties" in value:
                yield from undescribed(value, f"{path}{key}.", "description" in value)
            elif "description" not in value and not mapping_described and "$ref" not in value:
                yield path + key

    missing = [*undescribed(schema, "", False), *undescribed(schema["$defs"]["run"], "training.", False)]
    assert missing == []
