"""What measuring training memory costs: the same training with and without the memory profile.

Target (issue 14): the profile of the first two steps slows an ordinary run by at most 5 %.
The default model (SmolLM2-135M-Instruct, fetched by the workflow into resources/models/), the
default config's LoRA settings and data, 30 steps; each configuration in its own process,
alternating, medians of the Trainer's train_runtime. Run it on an idle machine:

    python bench/memory_profile_cost.py [--repeats 3] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "resources/models/smollm2-135m-instruct"
DATA = REPO / "results/data/emoji_qa"

ONE_RUN = """
import json, sys, tempfile
sys.path.insert(0, {repo!r})
from loragrid import memory
from loragrid.train import train
memory.PROFILED_STEPS = {profiled}
settings = json.loads({settings!r})
with tempfile.TemporaryDirectory() as out:
    summary = train({model!r}, {data!r}, out + "/adapter", settings, "chat")
print("RESULT", json.dumps({{"runtime": summary["train_runtime_seconds"],
                            "profiling": summary["memory"].get("profiling_seconds", 0.0)}}))
"""


def settings(steps: int) -> dict:
    sys.path.insert(0, str(REPO))
    import yaml
    from snakemake.utils import update_config, validate

    from loragrid.config import check_config

    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    validate(config, str(REPO / "config/schema.yaml"))
    update_config(config, {"training": {"max_steps": steps}})
    return check_config(config, workdir=REPO)["lora"]


def run_once(profiled: int, run_settings: dict) -> dict:
    code = ONE_RUN.format(repo=str(REPO), profiled=profiled, settings=json.dumps(run_settings),
                          model=str(MODEL), data=str(DATA))
    with tempfile.TemporaryDirectory():
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    line = next((printed for printed in result.stdout.splitlines() if printed.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"training failed:\n{result.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if not MODEL.exists() or not (DATA / "train.jsonl").exists():
        raise SystemExit("fetch the model and prepare the data first: "
                         "snakemake --cores 1 resources/models/smollm2-135m-instruct "
                         "results/data/emoji_qa/train.jsonl")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    run_settings = settings(args.steps)
    times: dict[int, list[float]] = {0: [], 2: []}
    bookkeeping = []
    for repeat in range(args.repeats):
        for profiled in (0, 2):
            result = run_once(profiled, run_settings)
            times[profiled].append(result["runtime"])
            if profiled:
                bookkeeping.append(result["profiling"])
            print(f"repeat {repeat + 1}, profiled steps {profiled}: {result['runtime']:.1f} s")
    plain, profiled = statistics.median(times[0]), statistics.median(times[2])
    print(f"median train_runtime: without profile {plain:.1f} s {times[0]}, with {profiled:.1f} s {times[2]}")
    print(f"cost of the profile: {100 * (profiled / plain - 1):+.1f} % "
          f"(its own bookkeeping: median {statistics.median(bookkeeping):.2f} s)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
