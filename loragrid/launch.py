"""Where a training run runs: what its job asks a scheduler for, and `accelerate launch` for several GPUs.

Training itself starts in loragrid.train (`train_run`); this module only sizes the job and, for
more than one GPU, builds and runs the launch.

A run's `gpus` setting says how many GPUs its training job asks for: 0 asks for none (it trains
on the CPU, or on the GPU a local machine shows), 1 trains on one GPU, more trains one DDP process
per GPU through `accelerate launch`. The same setting gives the job's `gpu` resource, which the
SLURM profile turns into `sbatch --gpus`.

    python -m loragrid.launch CALL.json   # one DDP process: train_to_files(**CALL) (accelerate runs this)
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

# torch is imported only inside the functions that need it: Snakemake imports this module to plan
# the jobs, and torch's import would add about a second to every `snakemake` call.
from . import estimate
from .common import LoragridError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("loragrid.launch")

# Host memory (RAM, not GPU memory) a training job asks for. On a CPU the whole training state
# lives in RAM: what loragrid.estimate says training holds (weights as held, gradients,
# optimizer state, activations, temporaries), here for the longest sequence cutoff_len allows with
# every position labelled. With a GPU the host holds the weights only while loading them, in the
# dtype they load in (fp32 for full fine-tuning, bf16 otherwise).
LOAD_BYTES_PER_PARAMETER = {"full": 4, "lora": 2, "qlora4": 2, "qlora8": 2}
# Where no estimate exists, what a CPU job holds per parameter besides activations: full fine-tuning's fp32
# weights, gradients and AdamW moments and autocast's bf16 copy; the frozen bf16 weights otherwise.
STATE_BYTES_PER_PARAMETER = {"full": 18, "lora": 2, "qlora4": 2, "qlora8": 2}
# Python, torch, transformers and the tokenizer; with CUDA its libraries and context come on top.
PROCESS_OVERHEAD_BYTES = {"cpu": 1.5e9, "gpu": 4e9}
# The allocator's free lists and fragmentation above the tensors alive: the default run's
# resident peak during training was up to 1.2x its measured training memory (docs/memory.md).
SAFETY_MARGIN = 1.25


def gpus_of(settings: dict) -> int:
    return int(settings.get("gpus", 0))


def model_config(model_dir) -> dict:
    with open(Path(model_dir) / "config.json", encoding="utf-8") as handle:
        return json.load(handle)


def model_sizes(model_dir) -> dict:
    """The model's shape and parameter counts, from its config.json (loragrid.estimate.model_sizes)."""
    return estimate.model_sizes(model_config(model_dir))


def parameters_on_disk(model_dir) -> int:
    """The parameters in the folder's safetensors files, counted from their headers (no tensor is read).

    A pickled model (PICKLED_MODEL, the torch: source) is counted at 2 bytes a parameter: its dtype is
    unknown without unpickling it, and for fp32 weights that counts high, the safe side of a memory request."""
    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        total += sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    if not total:
        total = sum(path.stat().st_size for path in Path(model_dir).glob("*.bin")) // 2
    return total


def train_mem_mb(settings: dict, model_dir) -> int:
    """Host memory (MB) to request for one training job of this run with the model in `model_dir`.

    Raises FileNotFoundError naming `model_dir` while the model is not fetched yet, which
    Snakemake takes as "known once the input exists".
    """
    if not Path(model_dir).exists():
        raise FileNotFoundError(2, "the model is not fetched yet", str(model_dir))
    config = model_config(model_dir)
    if estimate.unknown_shape(config):
        return train_mem_mb_for(settings, None, parameters_on_disk(model_dir))
    return train_mem_mb_for(settings, estimate.model_sizes(config))


def train_mem_mb_for(settings: dict, sizes: dict | None, parameters: int | None = None) -> int:
    """Host memory (MB, rounded up to whole GB) for training a model of these sizes with this run.

    Without sizes (an architecture the estimate cannot describe) a CPU job asks for the weights and
    the optimizer's state of its `parameters` only: its activations are unknown (docs/slurm-and-gpus.md)."""
    gpus = gpus_of(settings)
    parameters = estimate.total_parameters(sizes) if sizes is not None else parameters
    if gpus:
        per_process = PROCESS_OVERHEAD_BYTES["gpu"] + LOAD_BYTES_PER_PARAMETER[settings["method"]] * parameters
    elif sizes is None:
        per_process = PROCESS_OVERHEAD_BYTES["cpu"] + STATE_BYTES_PER_PARAMETER[settings["method"]] * parameters
    else:
        micro, sequence = settings["micro_batch_size"], settings["cutoff_len"]
        held = estimate.estimate(sizes, settings, micro, sequence, micro * sequence,
                                 accumulation=settings.get("batch_size", micro) // micro)
        per_process = PROCESS_OVERHEAD_BYTES["cpu"] + held["total_bytes"]
    total = SAFETY_MARGIN * per_process * max(gpus, 1)  # DDP: one process, one copy per GPU
    return int(math.ceil(total / 1e9) * 1000)


def check_gpus(settings: dict) -> int:
    """The run's `gpus`, after checking that this process sees that many CUDA devices."""
    import torch

    gpus = gpus_of(settings)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > visible:
        # The bare key: a training job's keys_as_written names where the run got it (training.gpus,
        # grid.gpus, methods.lora.gpus, runs.x.gpus), as the checks at workflow start do.
        raise LoragridError(
            f"config key 'gpus': the run asks for {gpus} GPU(s) but this job sees {visible} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            "set gpus: 0 to train on the CPU"
        )
    return gpus


def mixed_precision(dtype: torch.dtype) -> str:
    """accelerate's name for the compute dtype the Trainer uses (see modeling.compute_dtype)."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def free_port() -> int:
    """A TCP port free now, for DDP's rendezvous: two multi-GPU jobs on one node must not share 29500."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_command(gpus: int, call_file, precision: str, port: int, python: str = sys.executable) -> list[str]:
    """`accelerate launch` of one DDP process per GPU on this node, each running `python -m loragrid.launch`."""
    return [
        python, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_machines", "1", "--num_processes", str(gpus),
        "--mixed_precision", precision, "--dynamo_backend", "no",
        "--main_process_port", str(port),
        "-m", "loragrid.launch", str(call_file),
    ]


def launch_processes(gpus: int, call: dict) -> None:
    """Run train_to_files(**call) in one DDP process per GPU through `accelerate launch`;
    the arguments travel to every process as a JSON file."""
    from . import modeling

    with tempfile.TemporaryDirectory(prefix="loragrid-launch-") as scratch:
        call_file = Path(scratch) / "call.json"
        call_file.write_text(json.dumps(call, default=str))
        command = accelerate_command(gpus, call_file, mixed_precision(modeling.compute_dtype()), free_port())
        log.info("%d GPUs: %s", gpus, " ".join(command))
        sys.stdout.flush()
        finished = subprocess.run(command, stdout=sys.stdout, stderr=subprocess.STDOUT, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"accelerate launch exited with status {finished.returncode}; its output is above")


def main(argv: list[str] | None = None) -> None:
    import argparse

    from .train import train_to_files

    parser = argparse.ArgumentParser(description="One DDP training process (started by accelerate launch).")
    parser.add_argument("call", type=Path, help="JSON file with train_to_files's keyword arguments")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s rank {os.environ.get('RANK', '0')} %(name)s: %(message)s")
    train_to_files(**json.loads(arguments.call.read_text()))


if __name__ == "__main__":
    main()
