"""Loading models the way each method needs them, and counting what they hold."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError

from .common import MANIFEST, LoragridError, lists_file, verify_folder

log = logging.getLogger("loragrid.modeling")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def process_gpu() -> int:
    """The CUDA device of this process: its LOCAL_RANK under `accelerate launch` (DDP), else the current one.

    Quantized weights are placed at load time, before the Trainer's accelerator picks each
    process's device, so every DDP process must name its own GPU here.
    """
    local_rank = os.environ.get("LOCAL_RANK")
    return int(local_rank) if local_rank is not None else torch.cuda.current_device()


def compute_dtype() -> torch.dtype:
    """bf16 wherever it is fast; fp16 only on GPUs without bf16 (fp16 matmuls crawl on a CPU)."""
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def attention_implementation(device_type: str | None = None) -> str | None:
    """Plain matmul attention on a CPU: measured 15% faster per LoRA step than SDPA's CPU flash
    kernel at these lengths (bf16, ~150 tokens). On a GPU, transformers' own choice (None): SDPA
    where the architecture supports it, else eager. Asking for SDPA fails to load Gemma 2, whose
    attention scores are softcapped, which SDPA cannot do."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return "eager" if device_type == "cpu" else None


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def quantization_config(method: str, settings: dict | None = None):
    """bitsandbytes settings for the QLoRA methods (None for full and lora).

    `settings` are the run's; without them (e.g. when merge rebuilds the training model)
    qlora4 gets the schema's defaults: NF4, double quantization, the automatic compute dtype.
    """
    from transformers import BitsAndBytesConfig

    settings = settings or {}
    if method == "qlora4":
        wanted = settings.get("bnb_4bit_compute_dtype", "auto")
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=settings.get("bnb_4bit_quant_type", "nf4"),
            bnb_4bit_use_double_quant=settings.get("bnb_4bit_use_double_quant", True),
            bnb_4bit_compute_dtype=compute_dtype() if wanted == "auto" else DTYPES[wanted],
        )
    if method == "qlora8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_causal_lm(model_dir, dtype: torch.dtype, trust_remote_code: bool = False, **kwargs):
    """The model in `model_dir`, as every stage loads it: the folder checked first, safetensors only.

    `use_safetensors=True` keeps transformers from falling back to a pytorch_model.bin that sits
    beside unrelated .safetensors files; a pickle is read only where loragrid wrote it (PICKLED_MODEL).
    """
    from transformers import AutoModelForCausalLM

    verify_folder(model_dir)
    pruned = load_pickled(model_dir, dtype)
    if pruned is not None:
        return pruned
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True, **kwargs)
    except (OSError, SafetensorError) as error:
        raise LoragridError(f"{model_dir}: the weights do not load ({error}); delete {model_dir} and run "
                            "snakemake again to rebuild it") from error
    return plain_4bit_kernel_where_packing_fails(model)


# bitsandbytes 0.50 runs a 4-bit layer's inference (eval mode, no gradients) on a CPU with AVX512-BF16 through a
# kernel of its own, after repacking the weights, which needs in_features a multiple of 64 and out_features a
# multiple of 32: other layers (a hidden size of 32) failed deep inside it (RuntimeError: shape '[32, 0]') in
# merge's check and chat --load-in-4bit, though training, which takes the plain kernel, ran.
PACKED_4BIT_IN, PACKED_4BIT_OUT = 64, 32


def plain_4bit_kernel_where_packing_fails(model):
    """`model`, its 4-bit layers of shapes the packed CPU kernel cannot take left on bitsandbytes' plain kernel
    (the same outputs: the one training used) through the layer's own switch."""
    bnb = sys.modules.get("bitsandbytes")  # a model with 4-bit layers imported it; a generate job does not
    if bnb is None:
        return model
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and (module.in_features % PACKED_4BIT_IN
                                                      or module.out_features % PACKED_4BIT_OUT):
            module.support_avx512bf16_for_cpu = False
    return model


def load_adapter(model, adapter_dir, **kwargs):
    """peft's own loader, on the adapter_model.safetensors that training wrote (never a .bin beside it)."""
    from peft import PeftModel

    verify_folder(adapter_dir)
    if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        raise LoragridError(f"{adapter_dir}: no adapter_model.safetensors (pickled .bin adapters are not loaded); "
                            f"delete {adapter_dir} and run snakemake again to train it")
    with without_peft_deprecation_warning():
        return PeftModel.from_pretrained(model, adapter_dir, **kwargs)


@contextlib.contextmanager
def without_peft_deprecation_warning():
    """peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` alias whenever it wraps a
    model. The FutureWarning is about peft's code, which no setting changes, and it filled every PEFT
    training and merge log; other warnings still show."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def load_for_training(model_dir, method: str, trust_remote_code: bool = False, settings: dict | None = None):
    """The base model as the method trains it.

    full keeps fp32 master weights (bf16 autocast does the math): with bf16 weights the
    small updates of fine-tuning round away. LoRA freezes the base, so a bf16 copy suffices.
    """
    dtype = torch.float32 if method == "full" else compute_dtype()
    kwargs = {"attn_implementation": attention_implementation()}
    quantization = quantization_config(method, settings)
    if quantization is not None:
        if has_pickled_model(model_dir):
            raise LoragridError(
                f"config key 'method': {method} quantizes weights while transformers loads them from safetensors; "
                f"{model_dir} holds a pickled model with pruned shapes, which trains with full or lora only"
            )
        kwargs["quantization_config"] = quantization
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": process_gpu()}
    return load_causal_lm(model_dir, dtype, trust_remote_code, **kwargs)


def load_for_inference(model_dir, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    model = load_causal_lm(model_dir, dtype or compute_dtype(), trust_remote_code,
                           attn_implementation=attention_implementation())
    return model.to(device()).eval()


# A model whose pruned layers have shapes no config.json describes stays a pickled
# {'model', 'tokenizer'} (see fetch.py's torch: source); every stage loads it from here.
PICKLED_MODEL = "pytorch_model.pickle.bin"


def has_pickled_model(model_dir) -> bool:
    return (Path(model_dir) / PICKLED_MODEL).exists()


def load_pickled(model_dir, dtype: torch.dtype):
    """The pickled model in `model_dir`, or None where the folder holds safetensors only."""
    path = Path(model_dir) / PICKLED_MODEL
    if not path.exists():
        return None
    if not lists_file(model_dir, PICKLED_MODEL):
        raise LoragridError(f"{path}: a pickle that loragrid did not write (the folder's {MANIFEST} does not list "
                            "it); loading a pickle runs code from the file, so it is not loaded. Remove it, or fetch "
                            "the model through a torch: source with model.allow_pickle: true")
    # Written by loragrid itself, from a source the config allowed to be unpickled (model.allow_pickle).
    return torch.load(path, map_location="cpu", weights_only=False)["model"].to(dtype)


def save_pickled(model, tokenizer, out_dir) -> None:
    torch.save({"model": model, "tokenizer": tokenizer}, Path(out_dir) / PICKLED_MODEL)


def lora_targets(settings: dict):
    """peft's target_modules for the run's: null means every linear layer, as the LoRA guide writes
    it; peft itself would read None as its per-architecture default (q_proj and v_proj for Llama)."""
    targets = settings["target_modules"]
    return "all-linear" if targets is None else targets


def add_lora(model, settings: dict):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    # QLoRA skips peft's prepare_model_for_kbit_training: it casts every unquantized frozen
    # parameter (the tied embedding and LM head, the norms) to fp32, which turns the residual
    # stream fp32 and makes bitsandbytes return fp32 layer outputs; at the memory table's
    # Qwen2.5-0.5B shape QLoRA-4 then held 6.27 GB instead of 4.58, above LoRA's 5.07
    # (without checkpointing; docs/memory.md). Frozen
    # weights stay in the compute dtype, as LoRA's do; gradient checkpointing comes from the
    # run's own setting through the Trainer, for every method alike.
    lora_config = LoraConfig(
        r=settings["lora_r"],
        lora_alpha=settings["lora_alpha"],
        lora_dropout=settings["lora_dropout"],
        target_modules=lora_targets(settings),
        bias=settings.get("lora_bias", "none"),
        use_rslora=settings.get("use_rslora", False),
        use_dora=settings.get("use_dora", False),
        task_type="CAUSAL_LM",
    )
    try:
        with without_peft_deprecation_warning():
            model = get_peft_model(model, lora_config)
    except ValueError as error:  # peft names the modules it could not find
        raise LoragridError(
            f"config key 'target_modules': {settings['target_modules']} does not match the model: {error} "
            f"(the model's linear modules: {', '.join(linear_module_names(model))})"
        ) from error
    # The Trainer runs LoRA under bf16/fp16 autocast, which casts each matmul's operands anyway;
    # peft's cast of every LoRA input to the fp32 adapter dtype only adds activation copies
    # (measured +8% tokens/s and -0.37 GiB peak RSS on a CPU, bench/README.md).
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False
    return model


def compile_decoder_layers(model, cache_dir) -> int:
    """torch.compile every repeated decoder layer in place (regional compilation); returns how many.

    The layers share one compiled graph (dynamo inlines the module, so the layer's own weights are
    inputs, not constants), with dynamic shapes so that a new sequence length does not recompile.
    The inductor cache lives in `cache_dir`, which every training job shares: a graph compiled
    once loads from there afterwards. Without a working C++ compiler (inductor's CPU kernels need
    one) nothing is compiled: a warning says so and training goes on eagerly, instead of dynamo
    failing on every frame in turn (11 tries, 27 s on the fixtures' 2-layer model). A frame that
    fails to compile for another reason (an operation inductor cannot lower) runs eagerly too:
    dynamo logs a warning, the job carries on.
    """
    import torch._dynamo
    from torch._inductor import cpp_builder, exc
    from transformers.modeling_layers import GradientCheckpointingLayer

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler as error:  # its message names the compiler inductor tried
        log.warning("compile_layers: training eagerly, nothing compiled: %s", error)
        return 0
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir).resolve())
    torch._dynamo.config.suppress_errors = True
    # The KV cache is for generation: in training it only adds a per-layer index the graph would specialise on.
    causal_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    causal_model.config.use_cache = False
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(dynamic=True)
    log.info("compiling %d decoder layers (torch.compile, inductor cache %s)", len(layers), cache_dir)
    return len(layers)


@functools.cache
def meta_model(source: str):
    """The model that `source` describes, built on the meta device (no weight is read or made): a model folder
    from its config.json, or a random: source's json file. None where transformers cannot build it so (remote
    code, a pickle of pruned shapes, an architecture it lacks): the jobs that load the weights name those."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(source)
    if path.is_dir() and has_pickled_model(path):
        return None
    try:
        if path.is_dir():
            config = AutoConfig.from_pretrained(path)
        else:  # fetch_model builds a random: source from the same json (its dtype only picks the weights' type)
            settings = json.loads(path.read_text(encoding="utf-8"))
            config = AutoConfig.for_model(**{key: value for key, value in settings.items()
                                             if key not in ("dtype", "torch_dtype")})
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # transformers raises many types for a config it cannot build; fetch_model names the cause
        return None


def module_names(model_dir) -> tuple[list[str], list[str]] | None:
    """(every module's name, the linear layers' last names) of the model in `model_dir` (a folder, or a random:
    source's json), from its meta-device model; None where there is none (meta_model)."""
    model = meta_model(str(model_dir))
    if model is None:
        return None
    return [name for name, _ in model.named_modules()], linear_module_names(model)


def unmatched_target_modules(model_dir, settings: dict) -> str | None:
    """What is wrong with a run's list of target modules for this model, or None. peft matches a name to a
    module named so or ending in '.name', and refuses only a list that matches nothing: a misspelt name beside
    a right one would leave its layers untrained without a word."""
    targets = settings.get("target_modules")
    names = module_names(model_dir) if isinstance(targets, list) and settings["method"] != "full" else None
    if names is None:
        return None
    modules, linear = names
    unknown = [target for target in targets
               if not any(module == target or module.endswith("." + target) for module in modules)]
    if not unknown:
        return None
    return f"{unknown} match no module of the model (its linear modules: {', '.join(linear)})"


def linear_module_names(model) -> list[str]:
    """The distinct last names of the model's linear layers: what target_modules can name."""
    linear_types = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    return sorted({name.rpartition(".")[2] for name, module in model.named_modules()
                   if isinstance(module, linear_types) and name})


def quantization_summary(model) -> dict | None:
    """What bitsandbytes actually did to the weights: read from the first quantized layer."""
    import bitsandbytes

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            state = module.weight.quant_state
            return {"bits": 4, "quant_type": state.quant_type, "double_quant": bool(state.nested),
                    "compute_dtype": str(module.compute_dtype).replace("torch.", "")}
        if isinstance(module, bitsandbytes.nn.Linear8bitLt):
            return {"bits": 8, "quant_type": "llm.int8"}
    return None


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; peft counts 4-bit packed weights at their real size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def weights_bytes(model) -> int:
    """Bytes held by parameters and buffers (quantized weights at their packed size)."""
    return model.get_memory_footprint()
