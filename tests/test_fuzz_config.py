"""Property-based test of config checking: random values at random keys of the default config, and
random whole sections, reach `checked_runs` (what the Snakefile and the CLI run). It may accept
them or raise a LoragridError naming the problem; any other exception is a bug."""

from __future__ import annotations

import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO
from loragrid.common import LoragridError
from loragrid.config import checked_runs

DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
SCHEMA = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
RUN_KEYS = sorted(SCHEMA["$defs"]["run"]["properties"])
SECTION_KEYS = {name: sorted(spec.get("properties", {})) for name, spec in SCHEMA["properties"].items()}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["all-linear", "lora", "qlora4", "{instruction}", "{", "local:data/emoji_qa.jsonl", "", "-1"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=12)
# (section, key or None for the whole section, value); keys of runs, methods and grid are run settings
changes = st.one_of(
    st.tuples(st.sampled_from(sorted(SECTION_KEYS)), st.none(), values),
    st.sampled_from(sorted(SECTION_KEYS)).flatmap(
        lambda section: st.tuples(st.just(section), st.sampled_from(SECTION_KEYS[section] or RUN_KEYS), values)),
    st.tuples(st.just("grid"), st.sampled_from([*RUN_KEYS, "_"]), values),
    st.tuples(st.just("runs"), st.text(max_size=12), values),
)


def _apply(config: dict, section: str, key, value) -> None:
    if key is None or not isinstance(config.get(section), dict):
        config[section] = value
    else:
        config[section][key] = value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(changes, min_size=1, max_size=3))
def test_config_checking_names_every_bad_value(edits):
    config = copy.deepcopy(DEFAULT)
    for section, key, value in edits:
        _apply(config, section, key, value)
    try:
        checked_runs(config, workdir=REPO)
    except LoragridError as error:
        assert str(error)
