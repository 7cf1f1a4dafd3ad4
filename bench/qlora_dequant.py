"""What bitsandbytes' CPU training path spends turning packed weights back into bf16, per step.

    python bench/qlora_dequant.py               # the embedded SmolLM2-135M-Instruct (fetch it first)
    python bench/qlora_dequant.py --model DIR

On a CPU, bitsandbytes trains a quantized layer by dequantizing its whole weight and calling a bf16
matmul: `dequantize_4bit` (its C kernel) for 4-bit layers, and for 8-bit layers
`MatMul8bitFp` (bitsandbytes/autograd/_functions.py), which converts the int8 weight to bf16 and
then scales it in place, two passes over the weight. It does so in the forward and again in the
backward; with gradient checkpointing (QLoRA's default) the forward runs twice, so every weight is
dequantized three times per step. This times one dequantization of every quantized layer of the
model, as bitsandbytes does it, and for 8-bit also as one fused pass (`torch.mul` of the int8
weight by its bf16 row scales), medians of repeats, and prints the per-step cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEQUANTIZATIONS_PER_STEP = 3  # forward, the checkpointed forward again, backward


def quantized_layers(model_dir: Path, method: str) -> list:
    import bitsandbytes as bnb

    from loragrid.modeling import load_for_training

    model = load_for_training(model_dir, method, settings={})
    kind = bnb.nn.Linear4bit if method == "qlora4" else bnb.nn.Linear8bitLt
    layers = [module for module in model.modules() if isinstance(module, kind)]
    for layer in layers:
        if method == "qlora8" and layer.weight.CB is not None:
            layer.init_8bit_state()  # what the layer's first forward does: int8 weights and scales move to its state
    return layers


def dequantize_all(layers: list, how: str) -> None:
    import bitsandbytes.functional as F
    import torch

    for layer in layers:
        if how == "4bit":
            F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
        elif how == "8bit":  # as MatMul8bitFp: convert, then scale in place
            layer.state.CB.data.to(torch.bfloat16).mul_(layer.state.SCB.unsqueeze(1).mul(1.0 / 127.0))
        else:  # one fused pass
            torch.mul(layer.state.CB.data, (layer.state.SCB / 127.0).to(torch.bfloat16).unsqueeze(1))


def median_seconds(layers: list, how: str, repeats: int) -> float:
    dequantize_all(layers, how)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        dequantize_all(layers, how)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "resources/models/smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}; torch threads: {torch.get_num_threads()}")
    for method, ways in (("qlora4", ["4bit"]), ("qlora8", ["8bit", "8bit fused"])):
        layers = quantized_layers(args.model, method)
        parameters = sum(layer.in_features * layer.out_features for layer in layers)
        for how in ways:
            seconds = median_seconds(layers, how, args.repeats)
            print(f"{method}: {len(layers)} layers, {parameters / 1e6:.1f}M weights, dequantized {how:10s}: "
                  f"{1000 * seconds:6.1f} ms once, {1000 * DEQUANTIZATIONS_PER_STEP * seconds:6.1f} ms per step")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
