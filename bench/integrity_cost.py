"""What checking a folder against its manifest costs each stage that reads it (docs/bad-input.md).

Copies a model folder (default: the fetched default model), writes its manifest as a stage would,
then times `verify_folder` on the usual path (sizes and mtimes unchanged: no hashing) and on the
path where every mtime moved (a copy that did not keep them: every file is hashed). Medians of
repeats; run it on an idle machine.

    .venv/bin/python bench/integrity_cost.py [--model resources/models/smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loragrid.common import MANIFEST, _write_manifest, verify_folder  # noqa: E402


def median_seconds(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resources/models/smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        shutil.copytree(args.model, folder, copy_function=shutil.copy2,
                        ignore=shutil.ignore_patterns(MANIFEST))
        size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
        written = median_seconds(lambda: _write_manifest(folder), 1)
        unchanged = median_seconds(lambda: verify_folder(folder), args.repeats)
        for path in folder.rglob("*"):
            if path.is_file() and path.name != MANIFEST:
                os.utime(path)  # what a copy without kept mtimes looks like: every file is hashed
        moved = median_seconds(lambda: verify_folder(folder), args.repeats)
    print(f"{args.model}: {size / 1e6:.0f} MB in {sum(1 for _ in Path(args.model).rglob('*'))} files")
    print(f"writing the manifest (the writing stage, once): {written:.3f} s")
    print(f"check, files unchanged (every reading stage): {unchanged * 1e3:.2f} ms (median of {args.repeats})")
    print(f"check, every mtime moved (all files hashed): {moved:.3f} s (median of {args.repeats})")


if __name__ == "__main__":
    main()
