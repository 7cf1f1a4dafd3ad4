"""How fast Snakemake plans a 16-run grid, and how fast a no-op rerun of the finished grid is.

Target (issue 4): both under 5 s on the project's 2-core CPU machine. The grid is 4 methods x
2 learning rates x 2 seeds on the tiny test model (built here, no hub), with 1 training step and
2 new tokens per answer so that completing it takes minutes. Prints medians of 3 repeats.

    python bench/grid_scale.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from conftest import build_tiny_model, copy_workflow, demo_records, write_jsonl  # noqa: E402


def snakemake(workdir: Path, *args: str) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", *args],
                            cwd=workdir, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where to put the workflow copy (default: a temporary folder)")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="loragrid-grid-scale-"))
    workdir = copy_workflow(root / "workflow")
    model_dir = build_tiny_model(root / "tiny-model")
    write_jsonl(workdir / "tiny.jsonl", demo_records(48))
    config = workdir / "grid16.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "tiny", "source": f"local:{model_dir}"},
        "dataset": {"name": "tiny", "source": "local:tiny.jsonl"},
        "split": {"heldout_min": 8},
        "training": {"max_steps": 1, "micro_batch_size": 4, "lora_r": 4, "lora_alpha": 8, "cutoff_len": 96},
        "grid": {"method": ["full", "lora", "qlora4", "qlora8"], "learning_rate": [0.002, 0.0005], "seed": [42, 7]},
        "generate": {"max_new_tokens": 2, "batch_size": 8},
    }))
    base = ["all", "--configfile", str(config)]
    plan = [snakemake(workdir, *base, "--dry-run") for _ in range(3)]
    print(f"dry-run plan of 16 runs (fresh): median {statistics.median(plan):.2f} s  {[round(t, 2) for t in plan]}")
    complete = snakemake(workdir, *base)
    print(f"completing the grid (1 step per run): {complete:.0f} s")
    noop = [snakemake(workdir, *base) for _ in range(3)]
    print(f"no-op rerun of the finished grid: median {statistics.median(noop):.2f} s  {[round(t, 2) for t in noop]}")
    replan = [snakemake(workdir, *base, "--dry-run") for _ in range(3)]
    print(f"dry-run plan of the finished grid: median {statistics.median(replan):.2f} s  "
          f"{[round(t, 2) for t in replan]}")


if __name__ == "__main__":
    main()
