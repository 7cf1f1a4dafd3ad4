"""Where a training run runs: what its job asks a scheduler for, and `accelerate launch` for several GPUs.

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

import torch

from . import modeling
from .common import LoragridError

log = logging.getLogger("loragrid.launch")

# Host memory (RAM, not GPU memory) a training job asks for, in bytes per model parameter for what
# the weights and the training state take. On a CPU the whole training state lives in RAM: full
# fine-tuning keeps fp32 weights, gradients and two Adam moments (16 B); LoRA a bf16 copy of the
# frozen base (2 B); QLoRA reads the bf16 weights before bitsandbytes packs them (2 B). With a GPU
# the host holds the weights only while loading them (fp32 for full, bf16 otherwise).
HOST_BYTES_PER_PARAMETER = {
    "cpu": {"full": 16, "lora": 2, "qlora4": 2, "qlora8": 2},
    "gpu": {"full": 4, "lora": 2, "qlora4": 2, "qlora8": 2},
}
# Python, torch, transformers and the tokenizer; with CUDA its libraries and context come on top.
PROCESS_OVERHEAD_BYTES = {"cpu": 1.5e9, "gpu": 4e9}
# Without it the estimate falls short: the README's CPU table (SmolLM2-135M) peaked at 1.1x it.
# With it those peaks are 0.72-0.91 of the request.
SAFETY_MARGIN = 1.5


def gpus_of(settings: dict) -> int:
    return int(settings.get("gpus", 0))


def model_parameters(model_dir) -> int:
    """Parameters stored in the model folder's safetensors files (read from their headers only)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise LoragridError(f"{model_dir}: no *.safetensors files to size the training job from")
    total = 0
    for path in files:
        with safe_open(path, framework="pt") as weights:
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return total


def model_shape(model_dir) -> dict:
    """The sizes that set activation memory, from config.json (`text_config` for multimodal models)."""
    with open(Path(model_dir) / "config.json", encoding="utf-8") as handle:
        config = json.load(handle)
    config = config.get("text_config", config)
    return {key: int(config[key]) for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")}


def train_mem_mb(settings: dict, model_dir) -> int:
    """Host memory (MB) to request for one training job of this run with the model in `model_dir`.

    Raises FileNotFoundError naming `model_dir` while the model is not fetched yet, which
    Snakemake takes as "known once the input exists".
    """
    if not Path(model_dir).exists():
        raise FileNotFoundError(2, "the model is not fetched yet", str(model_dir))
    return train_mem_mb_for(settings, model_parameters(model_dir), model_shape(model_dir))


def train_mem_mb_for(settings: dict, parameters: int, shape: dict) -> int:
    """Host memory (MB, rounded up to whole GB) for training `parameters` weights of this shape."""
    gpus = gpus_of(settings)
    device = "gpu" if gpus else "cpu"
    per_process = PROCESS_OVERHEAD_BYTES[device] + HOST_BYTES_PER_PARAMETER[device][settings["method"]] * parameters
    if not gpus:
        per_process += modeling.activation_bytes(shape, settings["micro_batch_size"], settings["cutoff_len"],
                                                 settings["gradient_checkpointing"])
    total = SAFETY_MARGIN * per_process * max(gpus, 1)  # DDP: one process, one copy per GPU
    return int(math.ceil(total / 1e9) * 1000)


def check_gpus(settings: dict, run: str = "") -> int:
    """The run's `gpus`, after checking that this process sees that many CUDA devices."""
    gpus = gpus_of(settings)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > visible:
        where = f"runs.{run}.gpus" if run else "gpus"
        raise LoragridError(
            f"config key '{where}': the run asks for {gpus} GPU(s) but this job sees {visible} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            "set gpus: 0 to train on the CPU"
        )
    return gpus


def mixed_precision(dtype: torch.dtype) -> str:
    """accelerate's name for the compute dtype the Trainer uses (see modeling.compute_dtype)."""
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


def train_run(settings: dict, run: str = "", **call) -> dict | None:
    """Train one run here, or through `accelerate launch` when it asks for more than one GPU.

    `call` holds train_to_files's other arguments (paths, template, ...); on several GPUs they
    travel to every process as a JSON file.
    """
    from . import modeling
    from .train import train_to_files

    gpus = check_gpus(settings, run)
    if gpus <= 1:
        return train_to_files(settings=settings, **call)
    with tempfile.TemporaryDirectory(prefix="loragrid-launch-") as scratch:
        call_file = Path(scratch) / "call.json"
        call_file.write_text(json.dumps({**call, "settings": settings}, default=str))
        command = accelerate_command(gpus, call_file, mixed_precision(modeling.compute_dtype()), free_port())
        log.info("%d GPUs: %s", gpus, " ".join(command))
        sys.stdout.flush()
        finished = subprocess.run(command, stdout=sys.stdout, stderr=subprocess.STDOUT, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"accelerate launch exited with status {finished.returncode}; its output is above")
    return None


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
