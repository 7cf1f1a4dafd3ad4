"""Training throughput: the seed recipe vs TRL's SFTTrainer vs loragrid, on the same model, data and LoRA.

    python bench/train_throughput.py            # the comparison (about 14 minutes on 2 cores)
    python bench/train_throughput.py --qlora    # loragrid LoRA vs QLoRA-4/8, and TRL with the same bitsandbytes config
    python bench/train_throughput.py --levers   # loragrid with one setting changed at a time
    python bench/train_throughput.py --compile  # loragrid eager vs compile_layers, cold and warm cache

Every configuration trains the embedded SmolLM2-135M-Instruct (fetch it first:
`snakemake --cores 1 resources/models/smollm2-135m-instruct`) on the same first 128 records of
data/emoji_qa.jsonl, LoRA r=16 alpha=32 on all linear layers, the same epochs and learning rate:

- seed: the emoji tutorial: transformers Trainer, padding="max_length", max_length=512,
  labels = input_ids, per_device_train_batch_size=1, default precision (fp32);
- trl: TRL SFTTrainer with its default collator (dynamic padding), per_device_train_batch_size=4,
  bf16, gradient checkpointing off;
- loragrid: loragrid.train.train with the schema's defaults, batch 4 (micro-batch 4), one epoch.

Each configuration runs in its own process (so that peak RSS is its own), configurations
alternate within each repeat, and medians are reported. Effective tokens are the non-padding
tokens of the examples (prompt and answer, as tokenized for loragrid) times epochs: the same
count for every configuration, so tokens/s ratios are inverse ratios of training time. The
final loss is measured the same way for every trained model: mean loss on the answer tokens
of the 128 training examples, after training.

MFU counts the model FLOPs a step needs over the rate of a bf16 matmul measured in the same run
on the same threads: 4N per token for LoRA and QLoRA (frozen weights get no weight gradient:
forward 2N, input gradients 2N), 6N for full fine-tuning, 6 per adapter parameter per token,
and attention's two T x T matmuls per layer (12 x layers x hidden x T^2 per example of T tokens,
forward and backward), N counting the tied embedding once, as the LM head.

--qlora trains loragrid's lora, qlora4 and qlora8 with their defaults (QLoRA with gradient
checkpointing, as `gradient_checkpointing: auto` runs it) and TRL's SFTTrainer on the same
bitsandbytes config (loragrid.modeling.quantization_config) with gradient checkpointing on, and
loragrid's LoRA once more with gradient checkpointing on (loragrid-ckpt), which splits QLoRA's
gap to LoRA into what checkpointing costs and what the bitsandbytes layers cost.

--compile trains loragrid's LoRA eagerly and with compile_layers twice on one fresh inductor
cache: the first compiled run compiles cold, the second loads what the first wrote (warm). From
train.json's step_seconds: the compiling step (the first after the memory profile's two) and the
median step after it, against the eager run's same steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = REPO / "resources/models/smollm2-135m-instruct"
DATA = REPO / "data/emoji_qa.jsonl"
LORA = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
CONFIGURATIONS = ("seed", "trl", "loragrid")
QLORA_CONFIGURATIONS = ("loragrid", "loragrid-qlora4", "loragrid-qlora8", "trl-qlora4", "trl-qlora8")
# --qlora's extra row: loragrid's LoRA with gradient checkpointing on, as QLoRA trains by default.
LORA_CHECKPOINTED = "loragrid-ckpt"
TARGETS = {"seed": 12.0, "trl": 2.5, "qlora_vs_lora": 0.7}
# loragrid with one setting changed from its defaults, to measure what each lever is worth.
LEVERS = {
    "defaults": {},
    "no_group_by_length": {"group_by_length": False},
    "batch_size_8": {"batch_size": 8, "micro_batch_size": 8},
    "batch_size_8_micro_4": {"batch_size": 8, "micro_batch_size": 4},
    "micro_batch_2": {"micro_batch_size": 2},
    "gradient_checkpointing": {"gradient_checkpointing": True},
    "packing": {"packing": True},
    "adamw_torch": {"optimizer": "adamw_torch"},
    "cosine_schedule": {"lr_scheduler_type": "cosine"},
    "compile_layers": {"compile_layers": True},
}
# compile_layers compiles after the memory profile's steps: the first compiled step is this one (0-based).
FIRST_COMPILED_STEP = 2


def records(count: int) -> list[dict]:
    from loragrid.data import read_records

    whole_file = [{"file": str(DATA), "start": 1, "count": float("inf"), "unit": "line", "first": 1}]
    valid = [r for _, r, _ in read_records(DATA, whole_file, "qa", "question", ["answer_en", "answer_zh"]) if r]
    return valid[:count]


def example_lengths(examples: list[dict]) -> list[int]:
    """Tokens of each example (prompt, answer and EOS, as loragrid tokenizes them)."""
    from loragrid.templates import tokenize_example
    from loragrid.tokenized import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    return [len(tokenize_example(tokenizer, "chat", r["messages"], 512)["input_ids"]) for r in examples]


def effective_tokens(examples: list[dict]) -> int:
    return sum(example_lengths(examples))


def model_flops(lengths: list[int], parameters: int, adapter_parameters: int, method: str) -> float:
    """FLOPs of one pass of training over examples of these lengths (see the module's docstring)."""
    shape = json.loads((MODEL / "config.json").read_text())
    per_token = (6 if method == "full" else 4) * parameters + 6 * adapter_parameters
    attention = 12 * shape["num_hidden_layers"] * shape["hidden_size"] * sum(length**2 for length in lengths)
    return per_token * sum(lengths) + attention


def answer_loss(model, tokenizer, examples: list[dict]) -> float:
    """Mean cross-entropy on answer tokens (the same measure for every configuration)."""
    import torch

    from loragrid.templates import tokenize_example

    model.eval()
    total, count = 0.0, 0
    tokenized = [tokenize_example(tokenizer, "chat", r["messages"], 512) for r in examples]
    dtype = next(p for p in model.parameters()).dtype
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        for start in range(0, len(tokenized), 16):
            batch = tokenizer.pad([{"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}
                                   for t in tokenized[start:start + 16]], return_tensors="pt")
            labels = torch.full_like(batch["input_ids"], -100)
            for row, t in enumerate(tokenized[start:start + 16]):
                labels[row, :len(t["labels"])] = torch.tensor(t["labels"])
            logits = model(**batch).logits.float()
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                       ignore_index=-100, reduction="sum")
            total += losses.item()
            count += (labels[:, 1:] != -100).sum().item()
    return total / count


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")


def train_seed(examples, epochs, learning_rate, scratch):
    """The emoji tutorial's recipe, as written there."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    from loragrid.templates import render_prompt

    texts = [render_prompt(tokenizer, "chat", r["messages"][:-1]) + r["messages"][-1]["content"] + tokenizer.eos_token
             for r in examples]

    def tokenize(batch):
        tokenized = tokenizer(batch["text"], padding="max_length", max_length=512, truncation=True,
                              add_special_tokens=False)
        tokenized["labels"] = tokenized["input_ids"].copy()
        return tokenized

    dataset = Dataset.from_dict({"text": texts}).map(tokenize, batched=True, remove_columns=["text"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(MODEL), lora_config())
    args = TrainingArguments(output_dir=scratch, per_device_train_batch_size=1, num_train_epochs=epochs,
                             learning_rate=learning_rate, logging_steps=10, save_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    return model, tokenizer, time.perf_counter() - started


def train_trl(examples, epochs, learning_rate, scratch, method: str = "lora"):
    """TRL's SFTTrainer; for qlora4/qlora8 on the bitsandbytes config loragrid uses, with gradient
    checkpointing on as loragrid's QLoRA runs train."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from loragrid.modeling import quantization_config
    from loragrid.templates import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    dataset = Dataset.from_list([{"prompt": render_prompt(tokenizer, "chat", r["messages"][:-1]),
                                  "completion": r["messages"][-1]["content"]} for r in examples])
    quantized = method != "lora"
    args = SFTConfig(output_dir=scratch, per_device_train_batch_size=4, bf16=True, gradient_checkpointing=quantized,
                     num_train_epochs=epochs, learning_rate=learning_rate, logging_steps=10, save_strategy="no",
                     report_to="none", use_cpu=True, disable_tqdm=True, max_length=512)
    model = AutoModelForCausalLM.from_pretrained(MODEL, quantization_config=quantization_config(method))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora_config())
    started = time.perf_counter()
    trainer.train()
    return trainer.model, tokenizer, time.perf_counter() - started


def train_loragrid(examples, epochs, learning_rate, scratch, lever: dict, method: str = "lora", compile_cache=None):
    import yaml

    from loragrid.common import sha256_file, write_json, write_jsonl
    from loragrid.tokenized import load_tokenizer
    from loragrid.train import train

    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())
    defaults = {key: spec["default"] for key, spec in schema["properties"]["training"]["properties"].items()}
    # The bench's own batch (4: one short epoch, enough steps), whatever the default config's.
    settings = {**defaults, **LORA, "method": method, "learning_rate": learning_rate, "epochs": epochs,
                "max_steps": -1, "batch_size": 4, "micro_batch_size": 4, **lever}
    if settings["gradient_checkpointing"] == "auto":
        settings["gradient_checkpointing"] = method != "lora"  # as loragrid.config resolves `auto`
    data = Path(scratch) / "data"
    write_jsonl(data / "train.jsonl", examples)
    write_json(data / "prepare.json", {"input_sha256": sha256_file(DATA),
                                       "output_sha256": {"train.jsonl": sha256_file(data / "train.jsonl")}})
    summary = train(MODEL, data, Path(scratch) / "adapter", settings, "chat", compile_cache_dir=compile_cache)
    # The loss is measured on what loragrid wrote: the saved adapter on the base it trained
    # (bf16, or quantized again as in training).
    from peft import PeftModel

    from loragrid.modeling import load_for_training

    model = PeftModel.from_pretrained(load_for_training(MODEL, method, settings=settings), Path(scratch) / "adapter")
    # wall_seconds times trainer.train() as a whole, as for the other two configurations.
    return model, load_tokenizer(MODEL), summary["wall_seconds"], summary["step_seconds"]


def one_run(name: str, lever: str, count: int, epochs: float, learning_rate: float, threads: int,
            compile_cache=None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    examples = records(count)
    tokens = int(effective_tokens(examples) * epochs)
    tool, _, method = name.partition("-")
    method = method or "lora"
    steps = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        if tool == "seed":
            model, tokenizer, seconds = train_seed(examples, epochs, learning_rate, scratch)
        elif tool == "trl":
            model, tokenizer, seconds = train_trl(examples, epochs, learning_rate, scratch, method)
        else:
            model, tokenizer, seconds, steps = train_loragrid(examples, epochs, learning_rate, scratch, LEVERS[lever],
                                                             method, compile_cache)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        loss = answer_loss(model, tokenizer, examples)
        adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    flops = model_flops(example_lengths(examples), parameter_count(), adapter, method) * epochs
    return {"configuration": name, "lever": lever, "examples": len(examples), "tokens": tokens,
            "seconds": seconds, "tokens_per_second": tokens / seconds, "peak_rss_bytes": peak_rss,
            "final_answer_loss": loss, "threads": torch.get_num_threads(), "model_flops": flops,
            "step_seconds": steps}


def matmul_flops(dtype_name: str, size: int = 2048, repeats: int = 10) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def parameter_count() -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(MODEL / "model.safetensors", "pt") as handle:
        for key in handle.keys():
            size = 1
            for dimension in handle.get_slice(key).get_shape():
                size *= dimension
            total += size
    return total


def spawn(name: str, lever: str, args, compile_cache=None, label: str = "") -> dict:
    examples = args.seed_examples if name == "seed" and args.seed_examples else args.examples
    command = [sys.executable, __file__, "--one", name, "--lever", lever, "--examples", str(examples),
               "--epochs", str(args.epochs), "--learning-rate", str(args.learning_rate),
               "--threads", str(args.threads), "--model", str(MODEL)]
    if compile_cache:
        command += ["--compile-cache", str(compile_cache)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-4000:]}")
    run = {**json.loads(result.stdout.strip().splitlines()[-1]), "label": label or lever}
    print(f"  {name:9s} {label or lever:24s} {run['examples']:4d} examples {run['seconds']:7.1f} s "
          f"{run['tokens_per_second']:6.1f} tok/s  loss {run['final_answer_loss']:.3f}  "
          f"peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    return run


def summarize(runs: list[dict], key: str, flops_bf16: float) -> dict:
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run[key], []).append(run)
    table = {}
    for name, group in groups.items():
        rate = statistics.median(r["tokens_per_second"] for r in group)
        table[name] = {"repeats": len(group), "examples": group[0]["examples"],
                       "median_seconds": statistics.median(r["seconds"] for r in group), "tokens_per_second": rate,
                       "peak_rss_gib": statistics.median(r["peak_rss_bytes"] for r in group) / 2**30,
                       "final_answer_loss": statistics.median(r["final_answer_loss"] for r in group),
                       "mfu_vs_bf16_matmul": statistics.median(r["model_flops"] / r["seconds"] for r in group)
                       / flops_bf16}
    return table


def arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of trl and loragrid (and of each lever)")
    parser.add_argument("--seed-repeats", type=int, default=1,
                        help="repeats of the seed recipe: one run takes ~5 minutes, "
                             "so 3 would break the 15-minute budget")
    parser.add_argument("--seed-examples", type=int, default=0,
                        help="train the seed recipe on only this many examples (its tokens/s is per token, but its "
                             "loss is then not comparable); for a loaded machine where a full seed run does not fit")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run; 0: torch's default")
    parser.add_argument("--model", type=Path, help="the model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--levers", action="store_true", help="measure loragrid's levers instead of the comparison")
    parser.add_argument("--qlora", action="store_true", help="loragrid LoRA vs QLoRA-4/8, and TRL on the same QLoRA")
    parser.add_argument("--compile", action="store_true",
                        help="loragrid eager vs compile_layers with a cold and a warm inductor cache")
    parser.add_argument("--compile-cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--one", choices=CONFIGURATIONS + QLORA_CONFIGURATIONS[1:], help=argparse.SUPPRESS)
    parser.add_argument("--lever", default="defaults", choices=sorted(LEVERS), help=argparse.SUPPRESS)
    return parser.parse_args()


def print_levers(table: dict) -> None:
    baseline = table["defaults"]["tokens_per_second"]
    print(f"\n{'lever':24s} {'tok/s':>7s} {'vs defaults':>11s} {'loss':>6s} {'RSS GiB':>8s}")
    for lever, row in table.items():
        print(f"{lever:24s} {row['tokens_per_second']:7.0f} {row['tokens_per_second'] / baseline:10.2f}x "
              f"{row['final_answer_loss']:6.3f} {row['peak_rss_gib']:8.2f}")


def print_comparison(table: dict) -> None:
    print(f"\n{'configuration':16s} {'runs':>4s} {'examples':>8s} {'median s':>9s} {'tok/s':>7s} {'loss':>6s} "
          f"{'RSS GiB':>8s} {'MFU':>6s}")
    for name, row in table.items():
        print(f"{name:16s} {row['repeats']:4d} {row['examples']:8d} {row['median_seconds']:9.1f} "
              f"{row['tokens_per_second']:7.0f} {row['final_answer_loss']:6.3f} {row['peak_rss_gib']:8.2f} "
              f"{100 * row['mfu_vs_bf16_matmul']:5.1f}%")
    rate = {name: row["tokens_per_second"] for name, row in table.items()}
    losses = ", ".join(f"{name} {row['final_answer_loss']:.3f}" for name, row in table.items())
    if "seed" in rate:
        print(f"\nloragrid / seed: {rate['loragrid'] / rate['seed']:.1f}x (target >= {TARGETS['seed']:g}x)")
        print(f"loragrid / trl:  {rate['loragrid'] / rate['trl']:.2f}x (target >= {TARGETS['trl']:g}x)")
    for method in ("qlora4", "qlora8"):
        if f"loragrid-{method}" in rate:
            print(f"\nloragrid {method} / loragrid lora: {rate[f'loragrid-{method}'] / rate['loragrid']:.2f}x "
                  f"(target >= {TARGETS['qlora_vs_lora']:g}x); loragrid {method} / trl {method}: "
                  f"{rate[f'loragrid-{method}'] / rate[f'trl-{method}']:.2f}x")
    if LORA_CHECKPOINTED in rate:
        checkpointed = rate[LORA_CHECKPOINTED]
        print(f"gradient checkpointing alone: LoRA at {checkpointed / rate['loragrid']:.2f}x of its pace; "
              f"bitsandbytes' layers alone (both checkpointed): qlora4 "
              f"{rate['loragrid-qlora4'] / checkpointed:.2f}x, qlora8 {rate['loragrid-qlora8'] / checkpointed:.2f}x")
    print(f"final answer loss: {losses}")


def compile_runs(args) -> list[dict]:
    """Per repeat: eager, then compiled on a fresh cache (cold), then compiled again on it (warm)."""
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bench-compile-cache-") as cache:
            runs += [spawn("loragrid", "defaults", args, label="eager"),
                     spawn("loragrid", "compile_layers", args, compile_cache=cache, label="compiled, cold cache"),
                     spawn("loragrid", "compile_layers", args, compile_cache=cache, label="compiled, warm cache")]
    return runs


def print_compile(runs: list[dict]) -> None:
    print(f"\n{'run':22s} {'runs':>4s} {'median s':>9s} {'compiling step s':>17s} {'median later step s':>20s} "
          f"{'loss':>6s}")
    rows = {}
    for label in ("eager", "compiled, cold cache", "compiled, warm cache"):
        group = [run for run in runs if run["label"] == label]
        rows[label] = {
            "seconds": statistics.median(run["seconds"] for run in group),
            "first": statistics.median(run["step_seconds"][FIRST_COMPILED_STEP] for run in group),
            "later": statistics.median(statistics.median(run["step_seconds"][FIRST_COMPILED_STEP + 1:])
                                       for run in group),
        }
        print(f"{label:22s} {len(group):4d} {rows[label]['seconds']:9.1f} {rows[label]['first']:17.2f} "
              f"{rows[label]['later']:20.3f} {statistics.median(r['final_answer_loss'] for r in group):6.3f}")
    eager, warm = rows["eager"], rows["compiled, warm cache"]
    gain = eager["later"] - warm["later"]
    print(f"\nper-step gain after compiling: {gain:.3f} s ({100 * gain / eager['later']:.0f} %)")
    for label in ("compiled, cold cache", "compiled, warm cache"):
        cost = rows[label]["first"] - eager["first"]
        print(f"{label}: the compiling step costs {cost:.1f} s more than an eager one; "
              f"it pays off after {cost / gain:.0f} steps" if gain > 0 else f"{label}: no per-step gain")


def measure(args) -> None:
    import torch

    started = time.perf_counter()
    print(f"load average at start: {os.getloadavg()}; cores: {os.cpu_count()}; torch threads: "
          f"{args.threads or torch.get_num_threads()}", flush=True)
    examples = records(args.examples)
    flops = {dtype: matmul_flops(dtype) for dtype in ("bfloat16", "float32")}
    print(f"{len(examples)} examples, {int(effective_tokens(examples) * args.epochs)} effective tokens, "
          f"{parameter_count() / 1e6:.1f}M parameters; matmul bf16 {flops['bfloat16'] / 1e9:.0f} GFLOP/s, "
          f"fp32 {flops['float32'] / 1e9:.0f} GFLOP/s", flush=True)
    runs = []
    if args.levers:
        for _ in range(args.repeats):
            # compile_layers has its own mode (--compile), which controls the cache it compiles into.
            runs += [spawn("loragrid", lever, args) for lever in LEVERS if lever != "compile_layers"]
        print_levers(summarize(runs, "lever", flops["bfloat16"]))
    elif args.compile:
        print_compile(compile_runs(args))
    else:
        names = QLORA_CONFIGURATIONS if args.qlora else CONFIGURATIONS
        for repeat in range(max(args.repeats, args.seed_repeats)):
            runs += [spawn(name, "defaults", args) for name in names
                     if repeat < (args.seed_repeats if name == "seed" else args.repeats)]
            if args.qlora:  # LoRA with QLoRA's gradient checkpointing: what the quantized layers cost alone
                runs.append({**spawn("loragrid", "gradient_checkpointing", args), "configuration": LORA_CHECKPOINTED})
        print_comparison(summarize(runs, "configuration", flops["bfloat16"]))
    print(f"\nload average at end: {os.getloadavg()}; total {time.perf_counter() - started:.0f} s")


def main() -> None:
    args = arguments()
    global MODEL
    MODEL = (args.model or MODEL).resolve()
    if args.one:
        print(json.dumps(one_run(args.one, args.lever, args.examples, args.epochs, args.learning_rate, args.threads,
                                 args.compile_cache)))
        return
    if not MODEL.exists():
        raise SystemExit(f"{MODEL} is missing: run `snakemake --cores 1 resources/models/smollm2-135m-instruct` first")
    measure(args)


if __name__ == "__main__":
    main()
