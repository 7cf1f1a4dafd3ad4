"""What training holds in memory, measured per category during a few steps (loragrid.estimate
estimates the same categories beforehand).

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

import json
import logging
import time
import weakref
from pathlib import Path

import torch
import torch.optim.optimizer as torch_optimizer
from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .estimate import estimate, model_sizes, unknown_shape
from .templates import IGNORE_INDEX

log = logging.getLogger("loragrid.memory")

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "temporaries", "other")
# The first steps of a run: the first has the longest micro-batch under group_by_length (the
# Trainer's length-grouped sampler puts it first), the second already holds the optimizer state.
# Without length grouping the profile goes on until it has measured the longest example's micro-batch.
PROFILED_STEPS = 2
# Beside each checkpoint: a resumed run keeps the steps its first attempt measured (the Trainer skips
# the batches already trained, the longest micro-batch among them).
PROFILE_FILE = "loragrid_memory_profile.json"


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
    for module in model.modules():
        # bitsandbytes' 8-bit layers move their row scales from the weight to the layer's state on the first
        # forward pass (Linear8bitLt.init_8bit_state): counted there from then on.
        scales = getattr(getattr(module, "state", None), "SCB", None)
        if isinstance(scales, torch.Tensor):
            yield scales, "quantized_bytes"
    for buffer in model.buffers():
        yield buffer, "frozen_bytes"


class StepMemory(TorchDispatchMode):
    """Counts the bytes of every live tensor storage by category while it is entered; keeps the peak."""

    def __init__(self, model, optimizer):
        super().__init__()
        self.model, self.optimizer = model, optimizer
        self.live: dict[int, list] = {}  # storage id -> [category, bytes, weak reference, operation that made it]
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.peak = dict(self.current)
        self.peak_bytes = 0
        self.operations = self.peak_operation = 0
        self.in_optimizer = False
        self.optimizer_began = None  # (operation, peak bytes, breakdown) when the step's optimizer step began
        self.state_at_start = 0
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
                if self.optimizer_began and entry[3] <= self.peak_operation and category == "optimizer" \
                        and self.peak_operation > self.optimizer_began[0]:
                    self.peak[entry[0]] -= entry[1]  # state the step created before a peak within its optimizer step
                    self.peak[category] += entry[1]
                entry[0] = category
            return
        try:
            reference = weakref.ref(storage, lambda _, key=key: self._freed(key))
        except TypeError:  # storages without weak references cannot be followed: not counted
            return
        self.live[key] = [category, storage.nbytes(), reference, self.operations]
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
        self.state_at_start = self.current["optimizer"]
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
        self.optimizer_began = self.optimizer_began or (self.operations, self.peak_bytes, dict(self.peak))

    def _optimizer_ends(self, *_):
        self.in_optimizer = False
        self._count_state()

    def _note_peak(self) -> None:
        total = sum(self.current.values())
        if total > self.peak_bytes:
            self.peak_bytes, self.peak, self.peak_operation = total, dict(self.current), self.operations

    def with_later_state(self) -> dict | None:
        """A run's first step has the longest micro-batch (length-grouped batches) but no optimizer state yet:
        its forward and backward passes' peak plus the state this step created, as every later step holds
        it beside a micro-batch that long. None where the step began with the state (or never stepped)."""
        if self.state_at_start or not self.optimizer_began or not self.current["optimizer"]:
            return None
        _, peak_bytes, breakdown = self.optimizer_began
        state = self.current["optimizer"]
        return {"peak_bytes": peak_bytes + state,
                "breakdown": {**breakdown, "optimizer": breakdown["optimizer"] + state}}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        started = time.perf_counter()
        self.operations += 1
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


class MemoryProfiler:
    """Measures what training holds during the run's first `steps` optimizer steps (and on, without length
    grouping, until a micro-batch as long as the `longest` example's), the process's resident memory
    during training, and on CUDA the allocator's statistics."""

    def __init__(self, steps: int = PROFILED_STEPS, longest: int | None = None, resumed_from=None):
        self.steps, self.longest, self.tracker = steps, longest, None
        self.step_seconds, self.started, self.record = [], 0.0, {}
        self.shapes: list[tuple[int, ...]] = []
        self.profiled, self.restored = restored_profile(resumed_from), False
        if self.profiled:
            self.restored = True
            log.info("memory: keeping the %d step(s) measured before the resume (%s)", len(self.profiled),
                     resumed_from)

    @property
    def done(self) -> bool:
        seen = max((shape["sequence"] for step in self.profiled for shape in step["micro_batches"]), default=0)
        return len(self.profiled) >= self.steps and (self.longest is None or seen >= self.longest)

    def on_train_begin(self, args, state, control, **kwargs):
        self.record["rss_after_loading_bytes"] = resident_bytes()
        self.record["rss_peak_is_training_only"] = reset_resident_peak()
        self.record.update(cuda_memory_after_loading())

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.started = time.perf_counter()
        if not self.done:
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
        # The state the step created, as later steps hold it: only where a later step runs.
        later = self.tracker.with_later_state() if state.global_step < state.max_steps else None
        self.profiled.append({"step": state.global_step, "peak_bytes": self.tracker.peak_bytes,
                              "breakdown": self.tracker.peak, "micro_batches": self.shapes,
                              "with_later_state": later,
                              "seconds": seconds, "bookkeeping_seconds": self.tracker.bookkeeping_seconds})
        self.tracker = None

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            (checkpoint / PROFILE_FILE).write_text(json.dumps({"profiled": self.profiled}))

    def on_train_end(self, args, state, control, **kwargs):
        self.record["rss_peak_training_bytes"] = resident_bytes("VmHWM")
        self.record.update(cuda_memory_peaks())

    def summary(self) -> dict:
        return {**profile_summary(self.profiled, self.record), "profile_restored": self.restored}


def _profile_callback_class():
    from transformers import TrainerCallback

    class MemoryProfile(MemoryProfiler, TrainerCallback):
        """MemoryProfiler as a Trainer callback (TrainerCallback answers the events it leaves alone)."""

    return MemoryProfile


def restored_profile(checkpoint) -> list[dict]:
    """The steps measured before `checkpoint` was saved ([] without a checkpoint, or one saved without them)."""
    if checkpoint is None:
        return []
    saved = Path(checkpoint) / PROFILE_FILE
    if not saved.exists():
        log.warning("memory: %s has no memory profile; measuring the steps after the resume, which may miss the "
                    "longest micro-batch", checkpoint)
        return []
    return json.loads(saved.read_text())["profiled"]


def profile_summary(profiled: list[dict], record: dict) -> dict:
    """train.json's `memory.measured`: the highest profiled step's peak and its breakdown (the first step's
    with the optimizer state added where that is higher: `with_later_state`), beside the resident and CUDA
    figures in `record`."""
    if not profiled:
        return dict(record)
    candidates = [{**step, "with_later_state": False} for step in profiled]
    candidates += [{**step, **step["with_later_state"], "with_later_state": True}
                   for step in profiled if step.get("with_later_state")]
    highest = max(candidates, key=lambda step: step["peak_bytes"])
    bookkeeping = sum(step["bookkeeping_seconds"] for step in profiled)
    largest = max(highest["micro_batches"], key=lambda shape: (shape["rows"] * shape["sequence"], shape["labelled"]))
    return {"training_peak_bytes": highest["peak_bytes"], "breakdown": highest["breakdown"],
            "peak_step": highest["step"], "peak_with_later_state": highest["with_later_state"],
            "peak_micro_batch": largest, "profiled_steps": profiled, "profiling_seconds": bookkeeping, **record}


def memory_profile(settings: dict, lengths: list[int], resumed_from=None):
    """A Trainer callback that measures a run's training memory (see the module's docstring). Without length
    grouping (and without packing, whose rows join examples) it measures on to the longest example's step."""
    longest = None if settings["group_by_length"] or settings["packing"] else max(lengths)
    return _profile_callback_class()(PROFILED_STEPS, longest, resumed_from)


def estimate_for_model(model, settings: dict, rows: int, sequence: int, labelled: int, accumulation: int = 1,
                       optimizer_state: bool = True) -> dict:
    """The estimate with the loaded model's exact weights, trainable tensors, attention and device; None
    for an architecture the estimate cannot describe (estimate.unknown_shape says why)."""
    if unknown_shape(model.config.to_dict()):
        return None
    held = weights_held(model)
    embedding = model.get_input_embeddings().weight
    tensors = {"numels": [p.numel() for p in model.parameters() if p.requires_grad],
               "embedding": embedding.numel() if embedding.requires_grad else 0}
    # AdamW steps all tensors at once (foreach) where torch has foreach kernels for the device: CUDA, not a CPU.
    foreach = model.device.type in _get_foreach_kernels_supported_devices()
    return estimate(model_sizes(model.config.to_dict()), settings, rows, sequence, labelled,
                    weights_bytes=sum(held.values()), tensors=tensors,
                    attention=model.config._attn_implementation, accumulation=accumulation,
                    optimizer_state=optimizer_state, foreach=foreach)
