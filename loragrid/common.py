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


# Every folder a stage writes lists its files here; each stage that reads the folder checks them.
MANIFEST = "manifest.json"


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
    """sha256 of every file below `folder`, keyed by the relative path (the manifest, with its mtimes, aside)."""
    folder = Path(folder)
    return {
        str(path.relative_to(folder)): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path != folder / MANIFEST
    }


# Staging names: `.{output name}.tmp-{random}` beside the output.
STAGING_MARK = ".tmp-"


def _staging_path(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}{STAGING_MARK}", dir=final.parent))
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


def _write_manifest(folder: Path) -> None:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path != folder / MANIFEST:
            stat = path.stat()
            files[str(path.relative_to(folder))] = {"sha256": sha256_file(path), "size": stat.st_size,
                                                    "mtime_ns": stat.st_mtime_ns}
    write_json(folder / MANIFEST, {"files": files})


def _rebuild_hint(folder: Path) -> str:
    return f"delete {folder} and run snakemake again to rebuild it"


def verify_folder(folder: str | os.PathLike) -> None:
    """Fail when a file of `folder` changed since the stage that wrote it finished.

    Snakemake sees a directory output's own timestamp, not edits inside it. Sizes and mtimes
    are compared on every call (microseconds); a file's sha256 only where its mtime moved, so a
    copy that kept the bytes passes. Folders from before manifests fall back to source.json.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    if manifest.exists():
        files = read_json(manifest)["files"]
    elif (folder / "source.json").exists():  # fetched before manifests: sha256 only
        manifest, files = folder / "source.json", {name: {"sha256": digest} for name, digest in
                                                   (read_json(folder / "source.json").get("files") or {}).items()}
    else:
        return
    for name, recorded in files.items():
        path = folder / name
        if not path.is_file():
            raise LoragridError(f"{path}: missing, though {manifest} lists it; {_rebuild_hint(folder)}")
        stat = path.stat()
        if "size" in recorded and stat.st_size != recorded["size"]:
            raise LoragridError(f"{path}: {stat.st_size} bytes, {recorded['size']} when it was written (truncated or "
                                f"changed since); {_rebuild_hint(folder)}")
        if stat.st_mtime_ns != recorded.get("mtime_ns") and sha256_file(path) != recorded["sha256"]:
            raise LoragridError(f"{path}: changed since it was written (sha256 differs from {manifest}); "
                                f"{_rebuild_hint(folder)}")


def lists_file(folder: str | os.PathLike, name: str) -> bool:
    """True when the stage that wrote `folder` wrote `name` in it (its manifest, or an older fetch's source.json)."""
    for record, key in ((Path(folder) / MANIFEST, "files"), (Path(folder) / "source.json", "files")):
        if record.exists():
            return name in (read_json(record).get(key) or {})
    return False


def remove_stale_staging(final: Path) -> None:
    """Staging left by a job killed outright (kill -9, out of memory): `finally` never ran there.

    Only one job writes a given output at a time (Snakemake locks the working directory), so
    any staging of this output that exists now is a dead job's.
    """
    for stale in final.parent.glob(f".{final.name}{STAGING_MARK}*"):
        log.warning("removing %s, left by a job that was killed", stale)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, manifest: bool = True):
    """Yield a staging folder that replaces `final` only if the block succeeds.

    A job that dies half-way leaves no folder under the output's name, so Snakemake
    never mistakes a partial result for a finished one. The folder gets a manifest of its
    files, for the stages that read it (`manifest=False` for pages no stage reads back).
    """
    final = Path(final)
    staging = _staging_path(final)
    try:
        yield staging
        if manifest:
            _write_manifest(staging)
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
    remove_stale_staging(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}{STAGING_MARK}", dir=final.parent)
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
    # surrogateescape: a file name that is not valid UTF-8 reaches here as lone surrogates.
    return hashlib.sha256(canonical_json.encode("utf-8", "surrogateescape")).hexdigest()


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
