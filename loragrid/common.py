"""Small helpers every stage shares: atomic outputs, checksums, versions, logging."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

log = logging.getLogger("loragrid")

TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "datasets",
    "accelerate",
    "safetensors",
    "snakemake",
    "sacrebleu",
    "emoji",
)


class LoragridError(Exception):
    """A user-facing error: bad input or configuration, with a message that says what to fix."""


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def checksums(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file below `folder`, keyed by the relative path."""
    folder = Path(folder)
    return {
        str(path.relative_to(folder)): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _staging_path(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    staging.chmod(0o777 & ~_UMASK)  # mkdtemp makes it private; outputs get the user's usual mode
    return staging


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _usual_modes(folder: Path) -> None:
    """The user's usual modes for everything in `folder`: some writers (safetensors, mkstemp) make
    files private (0600), which other members of a group on a shared cluster then cannot read."""
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o777 & ~_UMASK)
        else:
            executable = path.stat().st_mode & 0o111
            path.chmod((0o666 | executable) & ~_UMASK)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Yield a staging folder that replaces `final` only if the block succeeds.

    A job that dies half-way leaves no folder under the output's name, so Snakemake
    never mistakes a partial result for a finished one.
    """
    final = Path(final)
    staging = _staging_path(final)
    try:
        yield staging
        _usual_modes(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w"):
    """Open a temporary file that is renamed to `final` only when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; outputs get the user's usual mode
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_file(path) as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def write_jsonl(path: str | os.PathLike, records) -> None:
    with atomic_file(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@contextlib.contextmanager
def logging_to(log_path: str | os.PathLike | None):
    """Send this process's stdout, stderr and `logging` output to the rule's log file.

    A LoragridError is written as one clear line (plus the log's path) instead of a
    traceback, because it describes bad input rather than a bug.
    """
    if log_path is None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        yield
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8", buffering=1) as handle:
        with contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
            logging.basicConfig(
                level=logging.INFO,
                format="%(asctime)s %(name)s: %(message)s",
                stream=handle,
                force=True,
            )
            try:
                yield
            except LoragridError as error:
                handle.write(f"ERROR: {error}\n")
                raise SystemExit(f"loragrid: {error}\n(details: {log_path})") from None
            except Exception:
                import traceback

                traceback.print_exc(file=handle)
                raise


def use_threads(count: int) -> int:
    """Give torch `count` CPU threads (0: one per available core), whatever OMP_NUM_THREADS says.

    Snakemake sets OMP_NUM_THREADS to the job's `threads`, which `--cores 1` caps at one;
    config key `torch_threads` decides instead, so a lone job can use the whole machine.
    """
    import torch

    count = count or len(os.sched_getaffinity(0))
    torch.set_num_threads(count)
    return count


def git_commit(folder: str | os.PathLike | None = None) -> str | None:
    """The workflow checkout's commit, with '-dirty' when tracked files differ; None outside git."""
    import subprocess

    folder = folder or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def settings_hash(settings: dict) -> str:
    canonical_json = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical_json.encode()).hexdigest()


def provenance(settings: dict, inputs: dict[str, str | os.PathLike], dataset_sha256: str | None = None) -> dict:
    """How a result was made: its settings and their hash, input checksums, versions, workflow commit.

    A fetched folder is identified by the sha256 of its source.json (which lists every file's
    checksum), any other folder by the sha256 of its files' checksums.
    """
    checksums_of_inputs = {}
    for name, path in inputs.items():
        path = Path(path)
        if path.is_dir() and (path / "source.json").exists():
            checksums_of_inputs[name] = sha256_file(path / "source.json")
        elif path.is_dir():
            checksums_of_inputs[name] = settings_hash(checksums(path))
        else:
            checksums_of_inputs[name] = sha256_file(path)
    if dataset_sha256:
        # The raw records' checksum, as prepare recorded it: the split alone does not say which file it came from.
        checksums_of_inputs["dataset"] = dataset_sha256
    return {
        "settings": settings,
        "settings_sha256": settings_hash(settings),
        "input_sha256": checksums_of_inputs,
        "versions": package_versions(),
        "workflow_commit": git_commit(),
    }
