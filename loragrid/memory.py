"""What training holds in memory: measured per category during a few steps, and estimated beforehand.

The measurement is exact tensor accounting. During the first `PROFILED_STEPS` optimizer steps of a
run, a TorchDispatchMode sees every tensor each operation returns and follows its storage until
it is freed: the bytes alive at each moment are the sum of the live storages, by category, and the
step's peak is the largest such sum (what `torch.cuda.max_memory_allocated` reports on a GPU, without
the allocator's rounding). Categories, as the field counts them:

- weights: parameters and buffers as held (4-bit and 8-bit weights at their packed size, with their
  quantization constants), split into quantized, frozen unquantized and trainable;
- gradients: the `.grad` of every trainable parameter;
- optimizer: the optimizer's state (AdamW's two moments);
- activations: what the forward pass created and still holds (mostly what autograd keeps for backward);
- temporaries: what the backward pass and the optimizer step create (activation gradients,
  recomputed activations under gradient checkpointing, dequantized weights);
- other: anything else created within the step.

Tensors are counted by storage, so views and tensors that share storage count once. Why not the
torch profiler's memory timeline: its categories come from recording every op's stack and shapes,
and torch's own MemTracker (torch.distributed._tools) fails on frozen parameters (it hooks a
gradient onto every parameter), which every adapter run has. This accounting costs one Python call
per op in the profiled steps only (bench/memory_profile_cost.py measures it; train.json records the
time spent in its bookkeeping).

The process's resident memory is recorded beside it: after loading, and its high-water mark
during the training steps only (Linux `clear_refs`), a secondary figure that also holds the
allocator's free lists, the libraries and the Python heap.
"""

from __future__ import annotations

import logging
import time
import weakref
from pathlib import Path

import torch
import torch.optim.optimizer as torch_optimizer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .templates import IGNORE_INDEX

log = logging.getLogger("loragrid.memory")

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "temporaries", "other")
# The first steps of a run: the first has the longest micro-batch under group_by_length (the
# Trainer's length-grouped sampler puts it first), the second already holds the optimizer state.
PROFILED_STEPS = 2


def quantization_constants(parameter) -> list[torch.Tensor]:
    """The tensors bitsandbytes keeps beside a packed weight (4-bit absmax and code, 8-bit row scales)."""
    constants = []
    state = getattr(parameter, "quant_state", None)
    while state is not None:
        constants += [t for t in (state.absmax, state.code, getattr(state, "offset", None))
                      if isinstance(t, torch.Tensor)]
        state = getattr(state, "state2", None)
    scales = getattr(parameter, "SCB", None)
    return constants + ([scales] if isinstance(scales, torch.Tensor) else [])


def is_quantized(parameter) -> bool:
    return type(parameter).__name__ in ("Params4bit", "Int8Params") and parameter.dtype in (torch.uint8, torch.int8)


def weights_held(model) -> dict:
    """Bytes of the weights as held while training: quantized (packed, with constants), frozen, trainable."""
    held = {"quantized_bytes": 0, "frozen_bytes": 0, "trainable_bytes": 0}
    seen = set()
    for tensor, kind in _weight_tensors(model):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:  # tied embeddings share one storage
            continue
        seen.add(storage.data_ptr())
        held[kind] += storage.nbytes()
    return held


def _weight_tensors(model):
    for parameter in model.parameters():
        if is_quantized(parameter):
            yield parameter, "quantized_bytes"
            for constant in quantization_constants(parameter):
                yield constant, "quantized_bytes"
        else:
            yield parameter, "trainable_bytes" if parameter.requires_grad else "frozen_bytes"
    for buffer in model.buffers():
        yield buffer, "frozen_bytes"


class StepMemory(TorchDispatchMode):
    """Counts the bytes of every live tensor storage by category while it is entered; keeps the peak."""

    def __init__(self, model, optimizer):
        super().__init__()
        self.model, self.optimizer = model, optimizer
        self.live: dict[int, list] = {}  # storage id -> [category, bytes, weak reference]
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.peak = dict(self.current)
        self.peak_bytes = 0
        self.in_optimizer = False
        self.in_forward = False  # set by MemoryProfile around each forward pass
        self.bookkeeping_seconds = 0.0
        self.hooks = []

    def count(self, tensor, category: str) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        entry = self.live.get(key)
        if entry is not None:
            if category in ("gradients", "optimizer") and entry[0] != category:
                self.current[entry[0]] -= entry[1]  # a step's new tensor that became a .grad or state
                self.current[category] += entry[1]
                entry[0] = category
            return
        try:
            reference = weakref.ref(storage, lambda _, key=key: self._freed(key))
        except TypeError:  # storages without weak references cannot be followed: not counted
            return
        self.live[key] = [category, storage.nbytes(), reference]
        self.current[category] += storage.nbytes()

    def _freed(self, key) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current[entry[0]] -= entry[1]

    def _count_state(self) -> None:
        for state in self.optimizer.state.values():
            for value in state.values():
                self.count(value, "optimizer")

    def __enter__(self):
        for tensor, _ in _weight_tensors(self.model):
            self.count(tensor, "weights")
        for parameter in self.model.parameters():
            self.count(parameter.grad, "gradients")
        self._count_state()
        self.hooks = [p.register_post_accumulate_grad_hook(lambda p: self.count(p.grad, "gradients"))
                      for p in self.model.parameters() if p.requires_grad]
        self.hooks += [torch_optimizer.register_optimizer_step_pre_hook(self._optimizer_begins),
                       torch_optimizer.register_optimizer_step_post_hook(self._optimizer_ends)]
        self._note_peak()
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)

    def _optimizer_begins(self, *_):
        self.in_optimizer = True

    def _optimizer_ends(self, *_):
        self.in_optimizer = False
        self._count_state()

    def _note_peak(self) -> None:
        total = sum(self.current.values())
        if total > self.peak_bytes:
            self.peak_bytes, self.peak = total, dict(self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        started = time.perf_counter()
        if self.in_optimizer or torch._C._current_graph_task_id() != -1:  # optimizer step, backward pass
            category = "temporaries"
        elif self.in_forward:
            category = "activations"
        else:
            category = "other"
        for tensor in tree_flatten(result)[0]:
            self.count(tensor, category)
        self._note_peak()
        self.bookkeeping_seconds += time.perf_counter() - started
        return result


def labelled_positions(inputs: dict) -> int:
    """Positions whose next token has a label: the only ones whose logits the loss needs."""
    if isinstance(inputs.get("shift_labels"), torch.Tensor):
        return int(inputs["shift_labels"].numel())
    labels = inputs.get("labels")
    return int((labels[..., 1:] != IGNORE_INDEX).sum()) if isinstance(labels, torch.Tensor) else 0


def resident_bytes(field: str = "VmRSS") -> int | None:
    """A line of /proc/self/status in bytes (VmRSS: resident now; VmHWM: its high-water mark)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_resident_peak() -> bool:
    """Restart VmHWM from the current resident size (Linux: writing 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cuda_memory_after_loading() -> dict:
    """On CUDA: what the allocator holds once the model is loaded; its peak counters restart here."""
    if not torch.cuda.is_available():
        return {}
    torch.cuda.reset_peak_memory_stats()
    return {"cuda_allocated_after_loading_bytes": torch.cuda.memory_allocated()}


def cuda_memory_peaks() -> dict:
    """On CUDA: the allocator's peaks since cuda_memory_after_loading (the table's GPU figure)."""
    if not torch.cuda.is_available():
        return {}
    return {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(),
            "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved()}


def _profile_callback_class():
    from transformers import TrainerCallback

    class MemoryProfile(TrainerCallback):
        """Measures what training holds during the first `steps` optimizer steps of this process,
        the process's resident memory during training, and on CUDA the allocator's statistics."""

        def __init__(self, steps: int = PROFILED_STEPS):
            self.steps, self.profiled, self.tracker = steps, [], None
            self.step_seconds, self.started, self.record = [], 0.0, {}
            self.shapes: list[tuple[int, ...]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.record["rss_after_loading_bytes"] = resident_bytes()
            self.record["rss_peak_is_training_only"] = reset_resident_peak()
            self.record.update(cuda_memory_after_loading())

        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.started = time.perf_counter()
            if len(self.profiled) < self.steps:
                self.shapes = []
                self.tracker = StepMemory(model, getattr(optimizer, "optimizer", optimizer))
                self.hooks = [model.register_forward_pre_hook(self._forward_begins, with_kwargs=True),
                              model.register_forward_hook(self._forward_ends)]
                self.tracker.__enter__()

        def _forward_begins(self, module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor):
                self.shapes.append({"rows": ids.shape[0], "sequence": ids.shape[-1],
                                    "labelled": labelled_positions(kwargs)})
            self.tracker.in_forward = True

        def _forward_ends(self, module, args, output):
            self.tracker.in_forward = False

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.started
            if self.tracker is None:
                self.step_seconds.append(seconds)
                return
            self.tracker.__exit__(None, None, None)
            for hook in self.hooks:
                hook.remove()
            self.profiled.append({"step": state.global_step, "peak_bytes": self.tracker.peak_bytes,
                                  "breakdown": self.tracker.peak, "micro_batches": self.shapes,
                                  "seconds": seconds, "bookkeeping_seconds": self.tracker.bookkeeping_seconds})
            self.tracker = None

        def on_train_end(self, args, state, control, **kwargs):
            self.record["rss_peak_training_bytes"] = resident_bytes("VmHWM")
            self.record.update(cuda_memory_peaks())

        def summary(self) -> dict:
            return profile_summary(self.profiled, self.record)

    return MemoryProfile


def profile_summary(profiled: list[dict], record: dict) -> dict:
    """train.json's `memory.measured`: the highest profiled step's peak and its breakdown, beside
    the resident and CUDA figures in `record`."""
    if not profiled:
        return dict(record)
    highest = max(profiled, key=lambda step: step["peak_bytes"])
    bookkeeping = sum(step["bookkeeping_seconds"] for step in profiled)
    largest = max(highest["micro_batches"], key=lambda shape: (shape["rows"] * shape["sequence"], shape["labelled"]))
    return {"training_peak_bytes": highest["peak_bytes"], "breakdown": highest["breakdown"],
            "peak_step": highest["step"], "peak_micro_batch": largest, "profiled_steps": profiled,
            "profiling_seconds": bookkeeping, **record}


def memory_profile(steps: int = PROFILED_STEPS):
    """A Trainer callback that measures training memory (see the module's docstring)."""
    return _profile_callback_class()(steps)


# --- The estimate -------------------------------------------------------------------------------
# Bytes per element: activations and frozen weights in the compute dtype (bf16/fp16), trainable
# weights, their gradients and AdamW's two moments in fp32 (bitsandbytes' 8-bit AdamW: 1 byte each).
HALF, SINGLE = 2, 4
OPTIMIZER_BYTES = {"adamw_bnb_8bit": 2, "paged_adamw_8bit": 2}
# Per element of the labelled positions' logits: the fp32 log-probabilities stay for the
# backward pass; at its start the loss's backward holds their fp32 gradient and its bf16 cast.
LOGITS_KEPT, LOGITS_BACKWARD = 4, 8
QUANTIZED_BYTES = {"qlora4": 0.5 + 1 / 64 + 4 / (64 * 256), "qlora8": 1.0}  # per weight, constants included
# Full fine-tuning keeps more per token and layer than an adapter run, in units of the hidden size:
# its residual stream is fp32 (fp32 weights), so each norm's trainable weight keeps the fp32
# normalized input (2 x 4h), and autocast makes a bf16 copy of the fp32 norm output for each of
# q, k, v and gate, up separately (3 more x 2h than the one shared bf16 input of a frozen base).
FULL_EXTRA_PER_TOKEN_LAYER = 14
ADAPTED_PER_LAYER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_sizes(config: dict) -> dict:
    """Shape and parameter counts of a Llama/Qwen2/Mistral-style decoder, from its config.json."""
    config = config.get("text_config", config)
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    kv_width = kv * config.get("head_dim", h // heads)
    linear_shapes = {"q_proj": (h, h), "k_proj": (h, kv_width), "v_proj": (h, kv_width), "o_proj": (h, h),
                     "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    embedding = config["vocab_size"] * h
    return {"hidden": h, "intermediate": i, "layers": layers, "heads": heads, "vocab": config["vocab_size"],
            "linear_shapes": linear_shapes,
            "layer_linear_params": layers * sum(a * b for a, b in linear_shapes.values()),
            "embedding_params": embedding,
            "lm_head_params": 0 if config.get("tie_word_embeddings", False) else embedding,
            "other_params": (2 * layers + 1) * h}


def total_parameters(sizes: dict) -> int:
    return sizes["layer_linear_params"] + sizes["embedding_params"] + sizes["lm_head_params"] + sizes["other_params"]


def lora_parameters(sizes: dict, settings: dict) -> int:
    """LoRA's trainable parameters: r x (in + out) for each adapted linear layer of every decoder layer."""
    names = adapted_modules(settings)
    return sizes["layers"] * settings["lora_r"] * sum(a + b for name, (a, b) in sizes["linear_shapes"].items()
                                                      if name in names)


def adapted_modules(settings: dict) -> tuple[str, ...]:
    targets = settings.get("target_modules", "all-linear")
    if targets in (None, "all-linear"):
        return ADAPTED_PER_LAYER
    targets = [targets] if isinstance(targets, str) else targets
    return tuple(name for name in ADAPTED_PER_LAYER if name in targets)


def projected_weights(sizes: dict, settings: dict) -> tuple[int, int]:
    """(weights bytes as held, trainable parameters) of a method, from the model's sizes alone."""
    method = settings["method"]
    total = total_parameters(sizes)
    if method == "full":
        return SINGLE * total, total
    lora = lora_parameters(sizes, settings)
    frozen = total - sizes["layer_linear_params"]
    linear = QUANTIZED_BYTES.get(method, HALF) * sizes["layer_linear_params"]
    return int(linear + HALF * frozen + SINGLE * lora), lora


def layer_activation_bytes(sizes: dict, settings: dict, sequence: int, attention: str = "eager") -> int:
    """Bytes one token keeps per decoder layer until the backward pass reaches it.

    Counted from what autograd saves in a Llama/Qwen2 block under bf16 autocast (docs/memory.md):
    the RMSNorms keep their fp32 inputs (2 x 4h); the linear layers' distinct inputs (attention
    and MLP inputs, o_proj's and down_proj's: 3h + i at 2 bytes); q and the head-expanded k and v
    (3h); eager attention its fp32 softmax and bf16 probabilities (6 x heads x sequence; SDPA a
    logsumexp, 4 x heads); the MLP's gate, its SiLU and up (3i); each adapter its rank-r middle.
    With gradient checkpointing only each layer's input stays, except what bitsandbytes' 8-bit
    matmul stores on its autograd context, outside what checkpointing can drop: its input
    (bitsandbytes/autograd/_functions.py, MatMul8bitFp.forward and MatMul8bitLt.forward).
    """
    h, i, heads, method = sizes["hidden"], sizes["intermediate"], sizes["heads"], settings["method"]
    linear_inputs = HALF * (3 * h + i)
    if settings["gradient_checkpointing"]:
        return (SINGLE if method == "full" else HALF) * h + (linear_inputs if method == "qlora8" else 0)
    attention_bytes = 6 * heads * sequence if attention == "eager" else 4 * heads
    kept = 2 * SINGLE * h + linear_inputs + HALF * 3 * h + attention_bytes + HALF * 3 * i
    if method == "full":
        return kept + FULL_EXTRA_PER_TOKEN_LAYER * h
    adapted = [sizes["linear_shapes"][name] for name in adapted_modules(settings)]
    kept += HALF * settings["lora_r"] * len(adapted)
    if settings.get("lora_dropout"):  # each adapter's dropout keeps its own copy of the input and a mask
        kept += (HALF + 1) * sum(fan_in for fan_in, _ in adapted)
    return kept


def estimate(sizes: dict, settings: dict, rows: int, sequence: int, labelled: int, *, weights_bytes: int | None = None,
             trainable: int | None = None, attention: str = "eager", accumulation: int = 1,
             optimizer_state: bool = True) -> dict:
    """What training holds at its peak: the start of the backward pass of a micro-batch of `rows` x
    `sequence` tokens, `labelled` of which have a label (only their logits are computed).

    Gradients count only with gradient accumulation (they outlive a micro-batch); the optimizer's
    state from the second step on (`optimizer_state`: False for the first step of a run)."""
    projected_bytes, projected_trainable = projected_weights(sizes, settings)
    weights = projected_bytes if weights_bytes is None else weights_bytes
    trainable = projected_trainable if trainable is None else trainable
    gradients = SINGLE * trainable
    optimizer = OPTIMIZER_BYTES.get(settings.get("optimizer"), 2 * SINGLE) * trainable if optimizer_state else 0
    tokens, logits = rows * sequence, labelled * sizes["vocab"]
    activations = tokens * sizes["layers"] * layer_activation_bytes(sizes, settings, sequence, attention)
    activations += LOGITS_KEPT * logits
    if settings["method"] == "full":  # autocast's bf16 copies of the fp32 weights, kept for the backward pass
        activations += HALF * (sizes["layer_linear_params"] + sizes["embedding_params"] + sizes["lm_head_params"])
    temporaries = LOGITS_BACKWARD * logits
    if settings["gradient_checkpointing"]:  # the backward pass recomputes one layer at a time
        unchecked = {**settings, "gradient_checkpointing": False}
        temporaries = max(temporaries, tokens * layer_activation_bytes(sizes, unchecked, sequence, attention))
    parts = {"weights": int(weights), "gradients": gradients if accumulation > 1 else 0, "optimizer": optimizer,
             "activations": int(activations), "temporaries": int(temporaries)}
    return {"total_bytes": sum(parts.values()), "breakdown": parts, "rows": rows, "sequence": sequence,
            "labelled": labelled, "trainable": trainable}


def estimate_for_model(model, settings: dict, rows: int, sequence: int, labelled: int, accumulation: int = 1,
                       optimizer_state: bool = True) -> dict:
    """The estimate with the loaded model's exact weights and trainable parameters."""
    from .modeling import attention_implementation

    held = weights_held(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return estimate(model_sizes(model.config.to_dict()), settings, rows, sequence, labelled,
                    weights_bytes=sum(held.values()), trainable=trainable,
                    attention=attention_implementation(), accumulation=accumulation,
                    optimizer_state=optimizer_state)


METHODS = ("full", "lora", "qlora8", "qlora4")


def projection(sizes: dict, settings: dict, sequence: int, labelled_share: float, attention: str,
               budget_bytes: float | None = None, micro_batches=(1, 2, 4, 8, 16, 32, 64)) -> list[dict]:
    """Per method, the estimate at `settings['micro_batch_size']` and, with a budget, the largest
    micro-batch whose estimate fits in it (None when not even 1 does)."""
    rows = []
    for method in METHODS:
        run = {**settings, "method": method}
        if run.get("gradient_checkpointing", "auto") == "auto":
            run["gradient_checkpointing"] = method.startswith("qlora")

        def held(micro, run=run):
            return estimate(sizes, run, micro, sequence, int(labelled_share * micro * sequence), attention=attention)

        row = {"method": method, "gradient_checkpointing": run["gradient_checkpointing"],
               **held(run["micro_batch_size"])}
        if budget_bytes is not None:
            fitting = [micro for micro in micro_batches if held(micro)["total_bytes"] <= budget_bytes]
            row["largest_micro_batch"] = max(fitting) if fitting else None
        rows.append(row)
    return rows
