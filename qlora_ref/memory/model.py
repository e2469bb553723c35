"""Memory of a QLoRA fine-tune, in bytes: weights, adapters, gradients, optimizer, activations.

A model is given by its shape (``ModelShape``; well-known open models ship as data in
``qlora_ref/memory/models.json``) and a fine-tuning run by ``FinetuneSetup``. ``estimate_memory``
returns a ``MemoryBreakdown``: one item per kind of buffer, totals, and a text table.
The command ``qlora-ref memory`` (``qlora_ref.cli.memory``) prints it.

Pairs with ``qlora_ref.state`` (the storage of one 4-bit tensor, counted here per linear layer
exactly as ``QuantState.nbytes`` counts it) and with the real buffers it is tested against:
the oracle's ``quantize_4bit``, bitsandbytes' ``Linear4bit`` and optimizers, PEFT's LoRA layers,
and autograd's saved tensors in a transformers model (``tests/test_memory.py``).

Note: the model of memory
    Everything is counted in bytes of live tensors; nothing is rounded to "bits per
    parameter" until the end.

    1. Base weights. Each linear layer of each decoder layer (``q_proj k_proj v_proj o_proj
       gate_proj up_proj down_proj``; a plain MLP has only ``up_proj`` and ``down_proj``) is one
       4-bit tensor, stored as in ``qlora_ref.state`` (Note: storage accounting): packed codes
       ``(n + 1) // 2``, then float32 absmax per block, or with double quantization uint8 codes
       per block + float32 nested absmax per 256 blocks + a float32 offset + the 256-entry
       float32 map; plus the 16-entry float32 codebook. Embeddings, the output head, norms and
       biases stay unquantized (bitsandbytes quantizes ``nn.Linear`` layers only and
       transformers skips the head): ``base_dtype`` for embeddings, head and biases,
       ``norm_dtype`` for norm weights. With ``quant_type=None`` the linear layers also stay in
       ``base_dtype`` (16-bit LoRA, or full fine-tuning).
    2. Adapters: for every adapted linear ``W (out, in)``, ``A (r, in)`` and ``B (out, r)`` in
       ``adapter_dtype``; their gradients in the same dtype; optionally a float32 master copy.
    3. Optimizer state, per trainable tensor (see ``OPTIMIZERS``): torch's AdamW keeps two
       states in the parameter's dtype; bitsandbytes' 32-bit optimizers keep float32 states;
       its 8-bit ones keep uint8 states plus one float32 absmax per 256 values, except that
       tensors under 4096 elements fall back to float32 states. Paged states live in unified
       memory: on the GPU until it runs short, then evicted to CPU RAM, so they are listed
       apart (``MemoryBreakdown.resident_bytes`` leaves them out).
    4. Activations kept for the backward pass (``qlora_ref.memory.activations``, Note:
       activations kept for backward).
    5. Transients of each phase of the step: the loss's float32 tensors, a decoder layer's
       backward scratch (Note: the backward scratch), the gradients as they appear. The peak
       is the fullest phase, not the sum of all items (``MemoryBreakdown``, Note: the peak of a
       training step).
    6. FSDP over ``num_gpus`` GPUs: every persistent item is split into per-GPU shards, two
       decoder-layer units are gathered at a time and the root unit stays gathered; with CPU
       offload the shards live in CPU RAM (``MemoryItem.where``).

    Validated against the measured peak of live tensor bytes of real training steps
    (``benchmarks/memory_measure.py``). Not counted: scratch inside operators (attention and
    cuBLAS workspaces), the CUDA context and the caching allocator (``qlora_ref.memory.fit``
    sets a reserve apart for them), optimizer step counters, and a key/value cache (there is
    none while training).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from qlora_ref.codebooks import codebook
from qlora_ref.double_quant import DYNAMIC_MAP
from qlora_ref.memory.activations import PHASES, activation_items, korthikanti_activation_bytes
from qlora_ref.memory.shapes import (  # re-exported: the calculator's public names
    LINEAR_NAMES,
    NORMS,
    ModelShape,
    check_positive_int,
    load_models,
    model_shape,
    published_parameters,
    shape_from_config,
)
from qlora_ref.state import BLOCKSIZES, INPUT_DTYPES, NESTED_BLOCKSIZE, QUANT_TYPES
from qlora_ref.text_table import format_table

__all__ = [
    "ModelShape",
    "FinetuneSetup",
    "MemoryItem",
    "MemoryBreakdown",
    "LINEAR_NAMES",
    "OPTIMIZERS",
    "LORA_LAYERS",
    "PHASES",
    "load_models",
    "model_shape",
    "shape_from_config",
    "published_parameters",
    "quantized_tensor_nbytes",
    "optimizer_state_nbytes",
    "estimate_memory",
    "korthikanti_activation_bytes",
    "activation_items",
    "format_bytes",
]

#: Optimizers: (number of states per trainable tensor, state storage, paged). Storage is
#: "param" (torch: the parameter's dtype), "float32" (bitsandbytes 32-bit) or "blockwise8"
#: (bitsandbytes 8-bit: uint8 states plus a float32 absmax per 256 values).
OPTIMIZERS = {
    "adamw_torch": (2, "param", False),
    "adamw_32bit": (2, "float32", False),
    "paged_adamw_32bit": (2, "float32", True),
    "adamw_8bit": (2, "blockwise8", False),
    "paged_adamw_8bit": (2, "blockwise8", True),
    "lion_32bit": (1, "float32", False),
    "paged_lion_8bit": (1, "blockwise8", True),
    "sgd": (0, "param", False),
    "sgd_momentum": (1, "param", False),
}
#: How an adapted layer runs (``FinetuneSetup.lora_layer``).
LORA_LAYERS = ("peft", "fused")
#: bitsandbytes' 8-bit optimizers: values per absmax block, and the smallest tensor they quantize.
OPTIMIZER_BLOCKSIZE = 256
OPTIMIZER_MIN_8BIT_SIZE = 4096

_FLOAT32 = 4


def _dtype_bytes(name: str, what: str) -> int:
    if name not in INPUT_DTYPES:
        raise ValueError(f"{what} must be one of {sorted(INPUT_DTYPES)}, got {name!r}")
    return INPUT_DTYPES[name].itemsize


@dataclass(frozen=True)
class FinetuneSetup:
    """A fine-tuning run: how the base is stored, what trains, and the batch.

    Attributes
    ----------
    quant_type : {"nf4", "fp4", "int4"} or None
        Storage of the base's linear layers; None keeps them in ``base_dtype``.
    blocksize : int
        One of ``qlora_ref.state.BLOCKSIZES``.
    double_quant : bool
        bitsandbytes' double quantization of the absmax.
    target_modules : "all-linear" or tuple of str
        Linear layers that get adapters (PEFT names). ``"all-linear"`` (PEFT's name for it, the
        default and the QLoRA paper's choice) adapts every linear layer the model has, the head
        excepted. A named layer the model lacks (``gate_proj`` in a plain MLP) is refused.
    rank : int
    adapter_dtype, compute_dtype, base_dtype, norm_dtype : {"float32", "float16", "bfloat16"}
        Defaults: bf16 adapters, bf16 compute, bf16 embeddings and head, float32 norms. Not
        the paper's recipe in every part: PEFT keeps adapters in float32 unless told otherwise
        (``autocast_adapter_dtype=True``; here ``adapter_dtype="float32"``).
    optimizer : str
        A key of ``OPTIMIZERS``; default bitsandbytes' paged 32-bit AdamW (the paper's).
    master_weights : bool
        Keep a float32 copy of every trainable parameter.
    batch_size, seq_len : int
    gradient_checkpointing : bool
    attention : {"sdpa", "eager"}
    lora_dropout : bool
        Whether LoRA dropout is active (its probability does not change the memory). Off by
        default; the QLoRA paper's scripts use 0.05 (33B, 65B) and 0.1 (smaller models).
    full_finetune : bool
        Train every parameter instead of adapters (needs ``quant_type=None``).
    lora_layer : {"peft", "fused"}
        How the adapted layer runs: ``"peft"`` (PEFT's LoRA layer around the frozen base: the
        base and each adapter are separate autograd nodes; with adapters in another dtype than
        the compute dtype each adapter casts and keeps its own copy of the input) or ``"fused"``
        (one autograd function for base and adapter, as ``qlora_gpu``'s ``QLoRALinear``: it keeps
        the input once and recomputes ``A x``).
    loss_chunk_tokens : int or None
        None: the loss as transformers computes it (float32 logits of every token, then
        ``cross_entropy``). An int: a fused, chunked linear cross-entropy (Liger's
        ``FusedLinearCrossEntropy``, Cut Cross-Entropy) that makes the logits of that many tokens
        at a time and their gradient in the forward pass.
    num_gpus : int
        Data-parallel GPUs. Above 1, FSDP shards the base weights, adapters, gradients and
        optimizer state over them (each decoder layer one FSDP unit, as Answer.AI's FSDP-QLoRA
        wraps it); each GPU runs its own ``batch_size x seq_len`` micro-batch.
    cpu_offload : bool
        FSDP's CPU offload: sharded parameters, gradients and optimizer state live in CPU RAM; the
        GPU holds only the units being computed (FSDP offloads on one GPU too).
    """

    quant_type: str | None = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    target_modules: tuple | str = "all-linear"
    rank: int = 64
    adapter_dtype: str = "bfloat16"
    optimizer: str = "paged_adamw_32bit"
    master_weights: bool = False
    batch_size: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = True
    compute_dtype: str = "bfloat16"
    base_dtype: str = "bfloat16"
    norm_dtype: str = "float32"
    attention: str = "sdpa"
    lora_dropout: bool = False
    full_finetune: bool = False
    lora_layer: str = "peft"
    loss_chunk_tokens: int | None = None
    num_gpus: int = 1
    cpu_offload: bool = False

    def __post_init__(self):
        if self.quant_type is not None and self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES} or None, got {self.quant_type!r}")
        if isinstance(self.blocksize, bool) or self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize {self.blocksize!r} is not allowed; use one of {BLOCKSIZES}")
        for f in ("rank", "batch_size", "seq_len", "num_gpus"):
            check_positive_int(f, getattr(self, f))
        if self.loss_chunk_tokens is not None:
            check_positive_int("loss_chunk_tokens", self.loss_chunk_tokens)
        if self.lora_layer not in LORA_LAYERS:
            raise ValueError(f"lora_layer must be one of {LORA_LAYERS}, got {self.lora_layer!r}")
        for f in ("adapter_dtype", "compute_dtype", "base_dtype", "norm_dtype"):
            _dtype_bytes(getattr(self, f), f)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {sorted(OPTIMIZERS)}")
        if self.attention not in ("sdpa", "eager"):
            raise ValueError(f"attention must be 'sdpa' or 'eager', got {self.attention!r}")
        targets = self.target_modules
        if targets != "all-linear":
            targets = (targets,) if isinstance(targets, str) else tuple(targets)
            object.__setattr__(self, "target_modules", targets)
        unknown = set() if targets == "all-linear" else set(targets) - set(LINEAR_NAMES)
        if unknown:
            raise ValueError(f"unknown target modules {sorted(unknown)}; expected names from {LINEAR_NAMES}")
        if not targets and not self.full_finetune:
            raise ValueError("target_modules is empty: nothing would train")
        if self.full_finetune and self.quant_type is not None:
            raise ValueError("full fine-tuning trains the base weights, which cannot stay 4-bit: set quant_type=None")

    def targets(self, model: ModelShape) -> tuple:
        """The adapted linear layers of ``model``, in forward order (empty for full fine-tuning).

        Raises
        ------
        ValueError
            If a named target is not a linear layer of ``model``.

        Examples
        --------
        >>> FinetuneSetup().targets(model_shape("phi-2"))
        ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'up_proj', 'down_proj')
        """
        if self.full_finetune:
            return ()
        layers = model.linear_layers()
        if self.target_modules == "all-linear":
            return tuple(layers)
        missing = set(self.target_modules) - set(layers)
        if missing:
            raise ValueError(f"model {model.name!r} has no linear layers {sorted(missing)} (its MLP is {model.mlp!r})")
        return tuple(n for n in layers if n in self.target_modules)


@dataclass(frozen=True)
class MemoryItem:
    """One kind of buffer: its name, category, bytes, whether it is paged, and when it is live.

    ``phases`` names the phases of a training step (``PHASES``) in which the buffer exists;
    weights, adapters and optimizer state exist in all of them. ``where`` is ``"gpu"``, or
    ``"cpu"`` for what FSDP's CPU offload keeps in host RAM (not counted against the GPU).
    """

    name: str
    category: str
    nbytes: int
    paged: bool = False
    note: str = ""
    phases: tuple = PHASES
    where: str = "gpu"


@dataclass(frozen=True)
class MemoryBreakdown:
    """The result of ``estimate_memory``: items, the peak over the step's phases, parameter counts.

    Note: the peak of a training step
        A step passes through phases (``PHASES``) and each buffer lives in some of them (Note:
        the model of memory). The memory a GPU must hold is the largest phase sum, the peak,
        not the sum of every item: the loss's float32 tensors are gone before the decoder
        layers' gradients exist, and activations are gone before the optimizer step.
    """

    model: ModelShape
    setup: FinetuneSetup
    items: tuple
    base_parameters: int
    trainable_parameters: int
    quantized_parameters: int = field(default=0)

    def phase_bytes(self, *, paged: bool = True) -> dict:
        """``{phase: bytes on the GPU in that phase}``; ``paged=False`` leaves paged state out."""
        return {phase: sum(i.nbytes for i in self.items if phase in i.phases and i.where == "gpu"
                           and (paged or not i.paged)) for phase in PHASES}

    @property
    def peak_phase(self) -> str:
        """The phase in which the GPU holds the most (the first, on a tie)."""
        per_phase = self.phase_bytes()
        return max(PHASES, key=lambda phase: per_phase[phase])

    @property
    def total_bytes(self) -> int:
        """The peak: bytes on the GPU in the fullest phase, paged optimizer state included."""
        return max(self.phase_bytes().values())

    @property
    def resident_bytes(self) -> int:
        """The peak without paged optimizer state (which can be evicted to CPU RAM)."""
        return max(self.phase_bytes(paged=False).values())

    @property
    def cpu_bytes(self) -> int:
        """What FSDP's CPU offload keeps in host RAM (per GPU's shard)."""
        return sum(i.nbytes for i in self.items if i.where == "cpu")

    def category_bytes(self, category: str) -> int:
        """Sum of the items of one category (``weights``, ``adapters``, ``gradients``,
        ``optimizer``, ``activations``, ``transient``), whatever their phase."""
        return sum(item.nbytes for item in self.items if item.category == category)

    def item_bytes(self, name: str) -> int:
        """Bytes of the item called ``name``; KeyError if there is none."""
        for item in self.items:
            if item.name == name:
                return item.nbytes
        raise KeyError(name)

    def to_dict(self) -> dict:
        """A JSON-ready dict: model, setup, items, phases, the peak (numbers as numbers)."""
        return {
            "model": asdict(self.model),
            "setup": asdict(self.setup),
            "items": [asdict(item) | {"phases": list(item.phases)} for item in self.items],
            "phase_bytes": self.phase_bytes(),
            "peak_phase": self.peak_phase,
            "base_parameters": self.base_parameters,
            "trainable_parameters": self.trainable_parameters,
            "quantized_parameters": self.quantized_parameters,
            "total_bytes": self.total_bytes,
            "resident_bytes": self.resident_bytes,
            "cpu_bytes": self.cpu_bytes,
        }

    def format_table(self) -> str:
        """Return the breakdown as an aligned text table: items, then each phase's sum and the peak."""
        peak = self.peak_phase
        total = self.total_bytes
        rows = []
        for item in self.items:
            if not item.nbytes:
                continue
            at_peak = "cpu" if item.where == "cpu" else ("yes" if peak in item.phases else "no")
            note = (item.note + " (paged)" if item.paged else item.note).strip()
            rows.append([item.name, item.category, item.nbytes, format_bytes(item.nbytes), at_peak, note])
        for phase, nbytes in self.phase_bytes().items():
            rows.append([f"phase: {phase}", "", nbytes, format_bytes(nbytes), "peak" if phase == peak else "", ""])
        rows.append([f"peak ({peak})", "", total, format_bytes(total), "", ""])
        if self.resident_bytes != total:
            rows.append(["peak without paged state", "", self.resident_bytes, format_bytes(self.resident_bytes), "", ""])
        if self.cpu_bytes:
            rows.append(["in CPU RAM (offloaded)", "", self.cpu_bytes, format_bytes(self.cpu_bytes), "", ""])
        s = self.setup
        base = f"{s.quant_type}, block {s.blocksize}, double quant {'on' if s.double_quant else 'off'}" if s.quant_type else f"{s.base_dtype}"
        where = "all linear layers" if s.target_modules == "all-linear" else ",".join(s.targets(self.model))
        train = "full fine-tune" if s.full_finetune else f"LoRA r={s.rank} on {where} ({s.adapter_dtype})"
        gpus = "" if s.num_gpus == 1 and not s.cpu_offload else (
            f"; FSDP over {s.num_gpus} GPU{'s' if s.num_gpus > 1 else ''}{', CPU offload' if s.cpu_offload else ''} (per GPU)")
        title = (f"{self.model.name}: {self.base_parameters:,} parameters ({base}); {train}, "
                 f"{self.trainable_parameters:,} trainable; {s.optimizer}; batch {s.batch_size} x {s.seq_len} tokens, "
                 f"checkpointing {'on' if s.gradient_checkpointing else 'off'}{gpus}")
        return format_table(["component", "category", "bytes", "size", "at peak", "note"], rows, title=title)


def format_bytes(nbytes: int) -> str:
    """Format bytes in binary units (KiB, MiB, GiB), as GPU memory is usually quoted.

    Examples
    --------
    >>> format_bytes(3 * 2**30 // 2)
    '1.50 GiB'
    """
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"


def quantized_tensor_nbytes(numel: int, *, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4") -> dict:
    """Bytes of one 4-bit tensor, split into codes and constants, as ``QuantState.nbytes`` counts them.

    Parameters
    ----------
    numel : int
        Elements of the tensor.
    blocksize : int
    double_quant : bool
    quant_type : {"nf4", "fp4", "int4"}

    Returns
    -------
    dict
        ``{"codes": packed bytes, "constants": absmax (or uint8 codes + nested absmax + offset +
        the nested map) + the codebook}``.

    Notes
    -----
    ``codes = ceil(n / 2)``; with ``n_b = ceil(n / B)`` blocks, constants are ``4 n_b`` bytes, or
    with double quantization ``n_b + 4 ceil(n_b / 256) + 4 + 4 * 256``; plus ``4 * 16`` for the
    codebook (QLoRA section 3, Double Quantization; ``qlora_ref.state``, Note: storage accounting).

    Examples
    --------
    >>> quantized_tensor_nbytes(4096 * 4096)
    {'codes': 8388608, 'constants': 267332}
    """
    check_positive_int("numel", numel)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize!r} is not allowed; use one of {BLOCKSIZES}")
    n_blocks = -(-numel // blocksize)
    if double_quant:
        nested_blocks = -(-n_blocks // NESTED_BLOCKSIZE)
        constants = n_blocks + _FLOAT32 * nested_blocks + _FLOAT32 + DYNAMIC_MAP.nbytes
    else:
        constants = _FLOAT32 * n_blocks
    return {"codes": (numel + 1) // 2, "constants": constants + codebook(quant_type).nbytes}


def optimizer_state_nbytes(numel: int, param_dtype: str, optimizer: str) -> int:
    """Bytes of one trainable tensor's optimizer state (see ``OPTIMIZERS``).

    Examples
    --------
    >>> optimizer_state_nbytes(64 * 4096, "bfloat16", "adamw_torch"), optimizer_state_nbytes(64 * 4096, "bfloat16", "adamw_8bit")
    (1048576, 532480)
    """
    check_positive_int("numel", numel)
    n_states, storage, _ = OPTIMIZERS[optimizer]
    if storage == "blockwise8" and numel >= OPTIMIZER_MIN_8BIT_SIZE:
        per_state = numel + _FLOAT32 * -(-numel // OPTIMIZER_BLOCKSIZE)
    elif storage == "param":
        per_state = numel * _dtype_bytes(param_dtype, "param_dtype")
    else:  # float32 states, and bitsandbytes' fallback for small tensors
        per_state = numel * _FLOAT32
    return n_states * per_state


def _trainable_tensors(model: ModelShape, setup: FinetuneSetup) -> list:
    """(numel, dtype) of every trainable tensor."""
    if setup.full_finetune:
        tensors = []
        for o, i in model.linear_layers().values():
            tensors += [(o * i, setup.base_dtype)] * model.num_layers
        for name in model.bias:
            out = model.vocab_size if name == "lm_head" else model.linear_layers()[name][0]
            tensors += [(out, setup.base_dtype)] * (1 if name == "lm_head" else model.num_layers)
        n_vectors = NORMS[model.norm][0] * (model.norms_per_layer * model.num_layers + 1)
        tensors += [(model.hidden_size, setup.norm_dtype)] * n_vectors
        tensors += [(model.vocab_size * model.hidden_size, setup.base_dtype)] * (1 if model.tie_embeddings else 2)
        return tensors
    layers = model.linear_layers()
    tensors = []
    for name in setup.targets(model):
        out_features, in_features = layers[name]
        tensors += [(setup.rank * in_features, setup.adapter_dtype), (out_features * setup.rank, setup.adapter_dtype)] * model.num_layers
    return tensors


def _weight_items(model: ModelShape, setup: FinetuneSetup) -> tuple[list, int]:
    """Items for the base model's weights, and the number of quantized parameters."""
    layers = model.linear_layers()
    base_bytes = _dtype_bytes(setup.base_dtype, "base_dtype")
    linear_numel = sum(o * i for o, i in layers.values()) * model.num_layers
    items, quantized = [], 0
    if setup.quant_type is None:
        items.append(MemoryItem("linear weights", "weights", linear_numel * base_bytes, note=setup.base_dtype))
    else:
        codes = constants = 0
        for o, i in layers.values():
            per = quantized_tensor_nbytes(o * i, blocksize=setup.blocksize, double_quant=setup.double_quant, quant_type=setup.quant_type)
            codes += per["codes"] * model.num_layers
            constants += per["constants"] * model.num_layers
        quantized = linear_numel
        items.append(MemoryItem("linear weights: 4-bit codes", "weights", codes, note=setup.quant_type))
        items.append(MemoryItem("linear weights: quantization constants", "weights", constants,
                                note="absmax, nested absmax, offset, code maps" if setup.double_quant else "float32 absmax, code map"))
    n_embed = model.vocab_size * model.hidden_size * (1 if model.tie_embeddings else 2)
    items.append(MemoryItem("embeddings and head" if not model.tie_embeddings else "embeddings (tied head)",
                            "weights", n_embed * base_bytes, note=setup.base_dtype))
    n_bias = sum(model.vocab_size if n == "lm_head" else layers[n][0] * model.num_layers for n in model.bias)
    n_norm = NORMS[model.norm][0] * model.hidden_size * (model.norms_per_layer * model.num_layers + 1)
    items.append(MemoryItem("norms and biases", "weights",
                            n_norm * _dtype_bytes(setup.norm_dtype, "norm_dtype") + n_bias * base_bytes,
                            note=f"norms {setup.norm_dtype}" + (f", biases {setup.base_dtype}" if n_bias else "")))
    return items, quantized


def _layer_unit_bytes(items: list, model: ModelShape) -> int:
    """Bytes of one decoder layer's share of the weights and adapters (one FSDP unit, gathered)."""
    per_layer = 0
    for item in items:
        if item.category == "adapters" or item.name.startswith("linear weights"):
            per_layer += item.nbytes // model.num_layers
    return per_layer


def _sharded(model: ModelShape, setup: FinetuneSetup, items: list) -> list:
    """FSDP over ``setup.num_gpus`` GPUs, with or without CPU offload (Note: the model of memory, 6).

    Every persistent item becomes its per-GPU shard (``ceil(bytes / N)``); with offload the
    shards move to CPU RAM. Each GPU then gathers two decoder-layer units at a time (the one
    computing and the one prefetched) in the forward and the layer backward, and keeps the
    root unit (embeddings, head, final norm) gathered through the step.
    """
    if setup.num_gpus == 1 and not setup.cpu_offload:
        return items
    n = setup.num_gpus
    unit = _layer_unit_bytes(items, model)
    root = sum(i.nbytes for i in items if i.name.startswith(("embeddings", "norms")))
    where = "cpu" if setup.cpu_offload else "gpu"
    out = [replace(i, nbytes=-(-i.nbytes // n), note=(i.note + f", 1/{n} shard").lstrip(", "), where=where)
           for i in items]
    out.append(MemoryItem("FSDP: root unit gathered (embeddings, head, final norm)", "weights",
                          root - (0 if setup.cpu_offload else -(-root // n))))
    out.append(MemoryItem("FSDP: two decoder-layer units gathered (computing, prefetched)", "transient", 2 * unit,
                          phases=("backward: top layer", "backward: bottom layer")))
    return out


def estimate_memory(model: ModelShape, setup: FinetuneSetup | None = None) -> MemoryBreakdown:
    """Return the memory of fine-tuning ``model`` with ``setup``, item by item.

    Parameters
    ----------
    model : ModelShape
        For example ``model_shape("llama-2-7b")``.
    setup : FinetuneSetup, optional
        Default: the QLoRA paper's recipe (NF4, block 64, double quantization, r=64 on all
        linear layers, bf16 adapters, paged 32-bit AdamW, batch 1 x 512, checkpointing).

    Returns
    -------
    MemoryBreakdown

    Raises
    ------
    ValueError
        If the setup adapts a linear layer the model lacks.

    Notes
    -----
    See Note: the model of memory, and Note: activations kept for backward. Base weights are
    ``sum over linear tensors of (ceil(n/2) + constants(n))`` plus the unquantized parts;
    adapters ``L * r * sum over targets of (in + out)`` elements.

    Examples
    --------
    >>> b = estimate_memory(model_shape("llama-2-7b"))
    >>> b.trainable_parameters
    159907840
    >>> round(b.category_bytes("weights") / 2**30, 2)
    3.6
    """
    if not isinstance(model, ModelShape):
        raise TypeError(f"model must be a ModelShape, got {type(model).__name__}")
    setup = FinetuneSetup() if setup is None else setup
    if not isinstance(setup, FinetuneSetup):
        raise TypeError(f"setup must be a FinetuneSetup, got {type(setup).__name__}")
    items, quantized = _weight_items(model, setup)
    trainable = _trainable_tensors(model, setup)
    n_trainable = sum(n for n, _ in trainable)
    if not setup.full_finetune:
        items.append(MemoryItem("LoRA adapters A, B", "adapters",
                                sum(n * _dtype_bytes(d, "adapter_dtype") for n, d in trainable), note=setup.adapter_dtype))
    # Gradients appear as the backward pass reaches each layer (set to None between steps).
    grads = sum(n * _dtype_bytes(d, "dtype") for n, d in trainable)
    if setup.full_finetune:
        items.append(MemoryItem("gradients of trainable parameters", "gradients", grads,
                                phases=("backward: bottom layer", "optimizer step")))
    else:  # a layer's first adapter gradients are counted with its backward scratch
        items.append(MemoryItem("gradients of the adapters of layers above 0", "gradients",
                                grads // model.num_layers * (model.num_layers - 1), phases=("backward: bottom layer",)))
        items.append(MemoryItem("gradients of trainable parameters", "gradients", grads, phases=("optimizer step",)))
    if setup.master_weights:
        items.append(MemoryItem("float32 master weights", "optimizer", n_trainable * _FLOAT32))
    n_states, storage, paged = OPTIMIZERS[setup.optimizer]
    state = sum(optimizer_state_nbytes(n, d, setup.optimizer) for n, d in trainable)
    if storage == "blockwise8" and any(n >= OPTIMIZER_MIN_8BIT_SIZE for n, _ in trainable):
        state += n_states * OPTIMIZER_BLOCKSIZE * _FLOAT32  # the shared 8-bit maps, one per state
    items.append(MemoryItem(f"optimizer state ({setup.optimizer})", "optimizer", state, paged=paged))
    items = _sharded(model, setup, items)
    items += [MemoryItem(name=name, category=category, nbytes=nbytes, note=note, phases=phases)
              for name, category, nbytes, note, phases in activation_items(model, setup)]
    return MemoryBreakdown(model=model, setup=setup, items=tuple(items), base_parameters=model.num_parameters(),
                           trainable_parameters=n_trainable, quantized_parameters=quantized)
