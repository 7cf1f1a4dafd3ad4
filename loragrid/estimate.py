"""The memory estimate: what each method holds while training (weights as held, gradients,
optimizer state, activations, temporaries), from a model's config.json and the run's settings.

Plain arithmetic without torch, because Snakemake imports it to plan: a training job's `mem_mb`
is this estimate (loragrid.launch), and importing torch would add a second to every `snakemake`
call. loragrid.memory measures the same categories while training; docs/memory.md compares both.
"""

from __future__ import annotations

# Bytes per element: activations and frozen weights in the compute dtype (bf16/fp16), trainable
# weights, their gradients and AdamW's two moments in fp32.
HALF, SINGLE = 2, 4
# bitsandbytes' 8-bit AdamW: two 1-byte moments and an fp32 absmax per 256-element block of each. Tensors
# under its min_8bit_size (4096 elements) and the input embedding (transformers' Trainer registers every
# nn.Embedding for 32-bit state) keep fp32 moments.
EIGHT_BIT_OPTIMIZERS = ("adamw_bnb_8bit", "paged_adamw_8bit")
EIGHT_BIT_STATE, MIN_8BIT_SIZE = 2 + 2 * SINGLE / 256, 4096
# Per element of the labelled positions' logits: the fp32 log-probabilities stay for the
# backward pass; at its start the loss's backward holds their fp32 gradient and its bf16 cast.
LOGITS_KEPT, LOGITS_BACKWARD = 4, 8
# Per weight, constants included: 4-bit blocks of 64 with a uint8 absmax and, per 256 blocks, an fp32 one
# (bnb_4bit_use_double_quant); without double quantization each block's absmax is fp32.
QUANTIZED_BYTES = {"qlora4": 0.5 + 1 / 64 + 4 / (64 * 256), "qlora8": 1.0}
SINGLY_QUANTIZED_4BIT_BYTES = 0.5 + 4 / 64
# Full fine-tuning keeps more per token and layer than an adapter run, in units of the hidden size:
# its residual stream is fp32 (fp32 weights), so each norm's trainable weight keeps the fp32
# normalized input (2 x 4h), and autocast makes a bf16 copy of the fp32 norm output for each of
# q, k, v and gate, up separately (3 more x 2h than the one shared bf16 input of a frozen base).
FULL_EXTRA_PER_TOKEN_LAYER = 14
# q and k normalised before RoPE: per head (RMSNorms over head_dim, weights shared by the heads), or
# over the whole projection (OLMo 2: weights as wide as q and k, and the weight product in fp32).
QK_NORM_MODEL_TYPES = ("qwen3", "gemma3_text", "olmo2")
WIDTH_QK_NORM_MODEL_TYPES = ("olmo2",)
# Gemma 2 and 3 also normalise each sublayer's output before the residual add: four RMSNorms a layer, not two.
SANDWICH_NORM_MODEL_TYPES = ("gemma2", "gemma3_text")
# Softcapping (cap x tanh(x / cap)) of the attention scores and of the logits keeps tanh's bf16 output for
# the backward pass; transformers' defaults where config.json leaves them out (Gemma 2: both on).
SOFTCAPPING_DEFAULTS = {"gemma2": {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}}
# transformers runs these eager on a GPU too (their classes have no SDPA: it cannot softcap scores).
EAGER_ONLY_MODEL_TYPES = ("gemma2",)
# The architectures whose estimate was checked against loragrid's measurement, every method within 3 %
# (docs/memory.md, bench/estimate_architectures.py).
CHECKED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
                       "granite")
# transformers' default where config.json leaves tie_word_embeddings out (as older versions wrote a default):
# the Gemma family ties, the other checked types do not.
TIED_BY_DEFAULT = ("gemma", "gemma2", "gemma3_text")
ADAPTED_PER_LAYER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# What the estimate reads from config.json; GPT-2, OPT, Bloom or Falcon name their shape otherwise.
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def unknown_shape(config: dict) -> str | None:
    """Why there is no estimate for this config.json (it does not describe a Llama-style decoder); else None."""
    missing = [key for key in SHAPE_KEYS if config.get("text_config", config).get(key) is None]
    if not missing:
        return None
    return (f"no memory estimate for model type {config.get('model_type')!r}: the estimate models Llama-style "
            f"decoders, whose config.json has {', '.join(SHAPE_KEYS)}; this one lacks {', '.join(missing)}")


def model_sizes(config: dict) -> dict:
    """Shape and parameter counts of a Llama/Mistral/Qwen/Gemma-style decoder, from its config.json."""
    config = config.get("text_config", config)
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    # Heads can be wider than hidden_size / heads (Qwen3-0.6B: 16 x 128 over 1024): q and o_proj are not square.
    head_dim = config.get("head_dim") or h // heads
    width, kv_width = heads * head_dim, kv * head_dim
    linear_shapes = {"q_proj": (h, width), "k_proj": (h, kv_width), "v_proj": (h, kv_width), "o_proj": (width, h),
                     "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    embedding = config["vocab_size"] * h
    model_type = config.get("model_type")
    qk_norm_width = width + kv_width if model_type in QK_NORM_MODEL_TYPES else 0
    qk_norm_tensors = []  # per layer: q's and k's norm weights
    if qk_norm_width:
        qk_norm_tensors = [width, kv_width] if model_type in WIDTH_QK_NORM_MODEL_TYPES else [head_dim, head_dim]
    norms = 4 if model_type in SANDWICH_NORM_MODEL_TYPES else 2
    defaults = SOFTCAPPING_DEFAULTS.get(model_type, {})

    def softcapped(key):
        return config.get(key, defaults.get(key)) is not None

    return {"model_type": model_type, "hidden": h, "intermediate": i, "layers": layers, "heads": heads,
            "vocab": config["vocab_size"],
            "attention_width": width, "qk_norm_width": qk_norm_width, "norms": norms, "linear_shapes": linear_shapes,
            "qk_norm_in_fp32": model_type in WIDTH_QK_NORM_MODEL_TYPES,
            "attention_softcapping": softcapped("attn_logit_softcapping"),
            "logit_softcapping": softcapped("final_logit_softcapping"),
            "layer_linear_params": layers * sum(a * b for a, b in linear_shapes.values()),
            "embedding_params": embedding,
            "lm_head_params": 0 if config.get("tie_word_embeddings", model_type in TIED_BY_DEFAULT) else embedding,
            "qk_norm_tensors": qk_norm_tensors,
            "other_params": (norms * layers + 1) * h + layers * sum(qk_norm_tensors)}


def unchecked_architecture(sizes: dict) -> str | None:
    """A warning where the model's architecture is not one the estimate was checked against; else None."""
    if sizes["model_type"] in CHECKED_MODEL_TYPES:
        return None
    return (f"the memory estimate was checked against measurement for model types {', '.join(CHECKED_MODEL_TYPES)} "
            f"(docs/memory.md), not for {sizes['model_type']!r}: it may be low")


def total_parameters(sizes: dict) -> int:
    return sizes["layer_linear_params"] + sizes["embedding_params"] + sizes["lm_head_params"] + sizes["other_params"]


def lora_parameters(sizes: dict, settings: dict) -> int:
    """LoRA's trainable parameters: r x (in + out) for each adapted linear layer of every decoder layer
    (DoRA: and a magnitude per output feature)."""
    return sum(trainable_tensors(sizes, {**settings, "method": "lora"})["numels"])


def adapted_modules(settings: dict) -> tuple[str, ...]:
    """The projections (in ADAPTED_PER_LAYER's names) that target_modules adapts; Phi-3's fused qkv_proj and
    gate_up_proj stand for the projections they hold."""
    targets = settings.get("target_modules", "all-linear")
    if targets in (None, "all-linear"):
        return ADAPTED_PER_LAYER
    targets = [targets] if isinstance(targets, str) else targets
    named = {part for target in targets for part in FUSED_PROJECTIONS.get(target, (target,))}
    return tuple(name for name in ADAPTED_PER_LAYER if name in named)


def projected_weights(sizes: dict, settings: dict) -> tuple[int, int]:
    """(weights bytes as held, trainable parameters) of a method, from the model's sizes alone."""
    method = settings["method"]
    total = total_parameters(sizes)
    if method == "full":
        return SINGLE * total, total
    lora = lora_parameters(sizes, settings)
    frozen = total - sizes["layer_linear_params"]
    per_weight = QUANTIZED_BYTES.get(method, HALF)
    if method == "qlora4" and not settings.get("bnb_4bit_use_double_quant", True):
        per_weight = SINGLY_QUANTIZED_4BIT_BYTES
    linear = per_weight * sizes["layer_linear_params"]
    return int(linear + HALF * frozen + SINGLE * lora), lora


def adapted_inputs(sizes: dict, settings: dict) -> int:
    """The bf16 inputs that an adapter run's linear layers keep: only an adapted layer's (its lora_A needs
    it for its gradient; a frozen layer needs its weight only), each distinct input once (q, k and v share
    the attention input, gate and up the MLP input). bitsandbytes' 8-bit layers keep theirs regardless."""
    adapted = set(adapted_modules(settings))
    inputs = {("q_proj", "k_proj", "v_proj"): sizes["hidden"], ("o_proj",): sizes["attention_width"],
              ("gate_proj", "up_proj"): sizes["hidden"], ("down_proj",): sizes["intermediate"]}
    return HALF * sum(width for names, width in inputs.items() if adapted.intersection(names))


def layer_activation_bytes(sizes: dict, settings: dict, sequence: int, attention: str = "eager") -> int:
    """Bytes one token keeps per decoder layer until the backward pass reaches it.

    Counted from what autograd saves in a Llama/Qwen/Gemma block under bf16 autocast (docs/memory.md),
    w = heads x head_dim: the RMSNorms keep their fp32 inputs (2 x 4h, Gemma 2 and 3 4 x 4h); the
    linear layers' distinct inputs (attention and MLP inputs, o_proj's and down_proj's: 2h + w + i at
    2 bytes; in an adapter run the adapted layers' only, `adapted_inputs`); q and the head-expanded k
    and v (3w); Qwen3's, Gemma 3's and OLMo 2's q and k norms their fp32 inputs; eager attention its
    fp32 softmax and bf16 probabilities (6 x heads x sequence, Gemma 2's softcapped scores 2 more; SDPA
    a logsumexp, 4 x heads, and its output, o_proj's input); the MLP's gate, its activation
    and up (3i); each adapter its rank-r middle (with dropout its own input copy and mask; DoRA the base
    layer's and the adapter's outputs).
    With gradient checkpointing only each layer's input stays, except what bitsandbytes' 8-bit
    matmul stores on its autograd context, outside what checkpointing can drop: its input
    (bitsandbytes/autograd/_functions.py, MatMul8bitFp.forward and MatMul8bitLt.forward).
    """
    h, i, heads, method = sizes["hidden"], sizes["intermediate"], sizes["heads"], settings["method"]
    width = sizes["attention_width"]  # heads x head_dim: h in Llama, Qwen2 and Mistral
    all_inputs = HALF * (2 * h + width + i)
    if settings["gradient_checkpointing"]:
        return (SINGLE if method == "full" else HALF) * h + (all_inputs if method == "qlora8" else 0)
    linear_inputs = all_inputs
    if method in ("lora", "qlora4"):
        linear_inputs = adapted_inputs(sizes, settings)
        if attention != "eager" and "o_proj" not in adapted_modules(settings):
            linear_inputs += HALF * width  # SDPA keeps its output, o_proj's input, for its own backward pass
    attention_bytes = 6 * heads * sequence if attention == "eager" else 4 * heads
    if attention == "eager" and sizes["attention_softcapping"]:  # SDPA ignores softcapping
        attention_bytes += HALF * heads * sequence
    kept = 2 * SINGLE * h + linear_inputs + HALF * 3 * width + attention_bytes + HALF * 3 * i
    # q and k norms keep their fp32 inputs; where trainable (full), their weight's product keeps the
    # normalised q and k too (bf16; OLMo 2 multiplies in fp32).
    if method == "full":
        kept += (SINGLE if sizes["qk_norm_in_fp32"] else HALF) * sizes["qk_norm_width"]
    kept += SINGLE * sizes["qk_norm_width"]
    # The sublayer output norms keep their fp32 inputs; where trainable, their fp32 normalised inputs too.
    kept += (sizes["norms"] - 2) * (2 if method == "full" else 1) * SINGLE * h
    if method == "full":
        return kept + FULL_EXTRA_PER_TOKEN_LAYER * h
    adapted = [sizes["linear_shapes"][name] for name in adapted_modules(settings)]
    kept += HALF * settings["lora_r"] * len(adapted)
    if settings.get("lora_dropout"):  # each adapter's dropout keeps its own copy of the input and a mask
        kept += (HALF + 1) * sum(fan_in for fan_in, _ in adapted)
    if settings.get("use_dora"):  # DoRA keeps the base layer's and the adapter's bf16 outputs for its magnitude
        kept += 2 * HALF * sum(fan_out for _, fan_out in adapted)
    return kept


def estimate(sizes: dict, settings: dict, rows: int, sequence: int, labelled: int, *, weights_bytes: int | None = None,
             tensors: dict | None = None, attention: str = "eager", accumulation: int = 1,
             optimizer_state: bool = True, foreach: bool = False) -> dict:
    """What training holds at its peak: the start of the backward pass of a micro-batch of `rows` x
    `sequence` tokens, `labelled` of which have a label (only their logits are computed), or where they
    hold more, full fine-tuning's LM-head gradient and end of the backward pass, an adapter run's layer in the
    backward pass, and the optimizer step (`foreach`: AdamW's multi-tensor step, torch's default on a GPU).

    Gradients count only with gradient accumulation (they outlive a micro-batch); the optimizer's
    state from the second step on (`optimizer_state`: False for the first step of a run). `tensors`:
    the trainable tensors as `trainable_tensors` describes them, where the model is at hand."""
    projected_bytes, _ = projected_weights(sizes, settings)
    weights = int(projected_bytes if weights_bytes is None else weights_bytes)
    tensors = trainable_tensors(sizes, settings) if tensors is None else tensors
    trainable = sum(tensors["numels"])
    state = optimizer_state_bytes(settings, tensors)
    optimizer = state if optimizer_state else 0
    # DDP (gpus > 1) keeps a copy of every gradient in its all-reduce buckets, from the first backward pass on.
    buckets = SINGLE * trainable if settings.get("gpus", 0) > 1 else 0
    held = {"weights": weights, "gradients": (SINGLE * trainable if accumulation > 1 else 0) + buckets,
            "optimizer": optimizer}
    tokens, logits = rows * sequence, labelled * sizes["vocab"]
    layers = tokens * sizes["layers"] * layer_activation_bytes(sizes, settings, sequence, attention)
    logits_kept = (LOGITS_KEPT + (HALF if sizes["logit_softcapping"] else 0)) * logits
    temporaries = LOGITS_BACKWARD * logits
    dora = dora_weight_norm_bytes(sizes, settings)
    recomputed = 0
    if settings["gradient_checkpointing"]:  # the backward pass recomputes one layer at a time
        unchecked = {**settings, "gradient_checkpointing": False}
        recomputed = tokens * layer_activation_bytes(sizes, unchecked, sequence, attention)
        temporaries = max(temporaries, recomputed + dora)
    full = settings["method"] == "full"
    # Full fine-tuning: autocast's bf16 copies of the fp32 weights, kept for the backward pass: every linear
    # layer's and the LM head's (an embedding lookup is not autocast: a separate embedding has none).
    layers += HALF * sizes["layer_linear_params"] if full else 0
    lm_head_copy = HALF * sizes["embedding_params"] if full else 0
    moments = [{**held, "activations": int(layers + logits_kept + lm_head_copy), "temporaries": int(temporaries)}]
    if dora and not settings["gradient_checkpointing"]:  # the last layer's forward pass, every layer's activations
        moments.append({**held, "activations": int(layers), "temporaries": dora})
    if full:
        moments += [lm_head_gradient(sizes, held, int(layers)),
                    end_of_backward(sizes, weights, optimizer, trainable, accumulation, buckets)]
    else:
        backward = int(recomputed + linear_backward_bytes(sizes, settings, tokens))
        moments += layer_backward(sizes, settings, held, int(layers), backward, trainable, tokens, accumulation)
    moments.append({"weights": weights, "gradients": SINGLE * trainable + buckets, "optimizer": state,
                    "activations": 0, "temporaries": optimizer_step_temporaries(settings, tensors, foreach)})
    parts = max(moments, key=lambda moment: sum(moment.values()))
    return {"total_bytes": sum(parts.values()), "breakdown": parts, "rows": rows, "sequence": sequence,
            "labelled": labelled, "trainable": trainable, "unchecked_architecture": unchecked_architecture(sizes)}


def dora_weight_norm_bytes(sizes: dict, settings: dict) -> int:
    """DoRA recomputes its weight's norm in each forward pass of an adapted layer (peft 0.21.2): an identity
    matrix as wide as the layer's input (bf16) and weight-sized products, 2 x in^2 + 16 x in x out bytes at
    once, fitted to measurements at 1024 x 1024, 1024 x 2816 and 2816 x 1024 (LoRA and QLoRA-4 alike); the
    widest adapted layer's. 0 without DoRA."""
    if not settings.get("use_dora") or settings["method"] == "full":
        return 0
    shapes = [sizes["linear_shapes"][name] for name in adapted_modules(settings)]
    return max((2 * fan_in * fan_in + 16 * fan_in * fan_out for fan_in, fan_out in shapes), default=0)


def linear_backward_bytes(sizes: dict, settings: dict, tokens: int) -> int:
    """What an adapted linear layer's backward pass creates, the largest layer's: its input's gradient through the
    frozen weight and through the adapter (2 x 2 bytes per input feature and token), and QLoRA's frozen weight,
    which bitsandbytes 0.50 dequantizes to bf16 for that gradient (MatMul4Bit's and both 8-bit matmuls' backward)."""
    quantized = settings["method"] in QUANTIZED_BYTES
    return max(HALF * fan_in * ((fan_out if quantized else 0) + 2 * tokens)
               for fan_in, fan_out in sizes["linear_shapes"].values())


def layer_backward(sizes: dict, settings: dict, held: dict, layers: int, temporaries: int, trainable: int,
                   tokens: int, accumulation: int) -> list[dict]:
    """An adapter run's decoder layer in the backward pass (`temporaries`: a linear layer's backward and, under
    gradient checkpointing, the recomputed layer), where it holds most: the first layer the backward pass
    reaches, beside every layer's activations; under gradient checkpointing also the last, where the other
    layers' checkpointed inputs are freed (not the inputs 8-bit layers keep) and their adapters' gradients are
    held. It matters with few tokens per step or a small vocabulary: at Mistral 7B's widths (2 layers, micro-batch
    1 x 235 tokens), QLoRA-4 with checkpointing was 0.85 of the measurement without it."""
    moments = [{**held, "activations": layers, "temporaries": temporaries}]
    if settings["gradient_checkpointing"] and accumulation == 1:  # with accumulation `held` has every gradient
        passed = sizes["layers"] - 1
        moments.append({**held, "gradients": held["gradients"] + SINGLE * trainable * passed // sizes["layers"],
                        "activations": layers - tokens * passed * HALF * sizes["hidden"], "temporaries": temporaries})
    return moments


def lm_head_gradient(sizes: dict, held: dict, layer_activations: int) -> dict:
    """Full fine-tuning's LM-head weight gradient: autocast's bf16 gradient and its fp32 cast are held together
    while the decoder layers' activations still are (the logits' and the LM head's bf16 copy are freed). With
    few labelled positions per hidden unit it is the step's peak: 0.986 of the measurement at OLMo 2 1B's
    widths (untied, 100,352 x 2048) without it, where a separate embedding's bf16 copy counted in error hid it."""
    return {**held, "activations": layer_activations, "temporaries": (HALF + SINGLE) * sizes["embedding_params"]}


def end_of_backward(sizes: dict, weights: int, optimizer: int, trainable: int, accumulation: int,
                    buckets: int = 0) -> dict:
    """Full fine-tuning's other peak: the end of the backward pass. The embedding's dense fp32 gradient
    comes last, when every other gradient is held and the activations are freed; a tied embedding adds
    it to its LM head's gradient into a third tensor of that size (autograd's input buffer). At Gemma 2
    2B's widths (tied, 256,000 tokens) that moment, not the backward pass's start, is the step's peak."""
    embedding = SINGLE * sizes["embedding_params"]
    held_gradients = SINGLE * trainable - (0 if accumulation > 1 else embedding) + buckets
    return {"weights": weights, "gradients": held_gradients, "optimizer": optimizer, "activations": 0,
            "temporaries": (3 if sizes["lm_head_params"] == 0 else 1) * embedding}


def trainable_tensors(sizes: dict, settings: dict) -> dict:
    """The element counts of the trainable tensors (`numels`), and of the input embedding where it is
    one of them (`embedding`, else 0): what the optimizer's state and step depend on."""
    layers = sizes["layers"]
    if settings["method"] != "full":  # LoRA's A (r x in) and B (out x r) of each adapted layer, DoRA's magnitude
        r, names = settings["lora_r"], adapted_modules(settings)
        shapes = [shape for name, shape in sizes["linear_shapes"].items() if name in names]
        adapters = [n for fan_in, fan_out in shapes for n in (r * fan_in, fan_out * r)]
        if settings.get("use_dora"):
            adapters += [fan_out for _, fan_out in shapes]
        return {"numels": adapters * layers, "embedding": 0}
    h = sizes["hidden"]
    layer = [a * b for a, b in sizes["linear_shapes"].values()] + [h] * sizes["norms"] + sizes["qk_norm_tensors"]
    embedding, lm_head = sizes["embedding_params"], [sizes["lm_head_params"]] if sizes["lm_head_params"] else []
    return {"numels": [embedding, *layer * layers, h, *lm_head], "embedding": embedding}


def optimizer_state_bytes(settings: dict, tensors: dict) -> int:
    """AdamW's two moments; bitsandbytes' 8-bit ones, with fp32 moments for small tensors and the input embedding."""
    numels = tensors["numels"]
    if settings.get("optimizer") not in EIGHT_BIT_OPTIMIZERS:
        return 2 * SINGLE * sum(numels)
    full_precision = sum(n for n in numels if n < MIN_8BIT_SIZE)
    if tensors["embedding"] >= MIN_8BIT_SIZE:
        full_precision += tensors["embedding"]
    return int(2 * SINGLE * full_precision + EIGHT_BIT_STATE * (sum(numels) - full_precision))


def optimizer_step_temporaries(settings: dict, tensors: dict, foreach: bool) -> int:
    """What `adamw_torch`'s step creates beside the gradients and the state (the fused AdamW and the 8-bit
    ones update in place). Its multi-tensor (foreach) step holds sqrt(v) of every parameter at once; the
    single-tensor step (torch's default off a GPU) holds one tensor's sqrt(v) and its quotient by the bias
    correction beside the previous tensor's denominator, except for the input embedding, stepped first."""
    if settings.get("optimizer") != "adamw_torch":
        return 0
    if foreach:
        return SINGLE * sum(tensors["numels"])
    rest = sorted(tensors["numels"], reverse=True)
    if tensors["embedding"]:
        rest.remove(tensors["embedding"])
    rest += [0, 0]
    return SINGLE * max(2 * tensors["embedding"], 2 * rest[0] + rest[1])


METHODS = ("full", "lora", "qlora8", "qlora4")


# Where the search for the largest micro-batch stops: far beyond what a single device trains with, and
# reached in 20 estimates at most.
MICRO_BATCH_CAP = 1024


def largest_fitting(fits, cap: int = MICRO_BATCH_CAP) -> int | None:
    """The largest micro-batch up to `cap` that `fits` (None when 1 does not). The estimate grows with
    the micro-batch, so doubling brackets the edge and bisection finds it in about 2 log2(cap) estimates."""
    if not fits(1):
        return None
    low = 1
    while low < cap:
        high = min(2 * low, cap)
        if not fits(high):
            while high - low > 1:  # low fits, high does not
                middle = (low + high) // 2
                low, high = (middle, high) if fits(middle) else (low, middle)
            return low
        low = high
    return cap


def projection(sizes: dict, settings: dict, sequence: int, labelled_share: float, attention: str,
               budget_bytes: float | None = None, foreach: bool = False) -> list[dict]:
    """Per method, the estimate at `settings['micro_batch_size']` and, with a budget, the largest
    micro-batch whose estimate fits in it (None when not even 1 does, MICRO_BATCH_CAP when the cap does)."""
    rows = []
    for method in METHODS:
        run = {**settings, "method": method}
        if run.get("gradient_checkpointing", "auto") == "auto":
            run["gradient_checkpointing"] = method.startswith("qlora")

        def held(micro, run=run):
            return estimate(sizes, run, micro, sequence, int(labelled_share * micro * sequence), attention=attention,
                            foreach=foreach)

        row = {"method": method, "gradient_checkpointing": run["gradient_checkpointing"],
               **held(run["micro_batch_size"])}
        if budget_bytes is not None:
            row["largest_micro_batch"] = largest_fitting(lambda micro: held(micro)["total_bytes"] <= budget_bytes)
        rows.append(row)
    return rows
