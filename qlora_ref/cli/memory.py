"""``qlora-ref memory``: the memory of a QLoRA fine-tune, item by item (``qlora_ref.memory``).

A model is named (``--model llama-2-70b``; ``--list-models`` shows the shipped ones) or given
by shape flags (``--hidden-size`` ...); shape flags given with ``--model`` override its fields.
Setup flags default to the QLoRA paper's recipe. ``--json`` prints the breakdown as JSON.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from qlora_ref.memory import (
    LINEAR_NAMES,
    OPTIMIZERS,
    FinetuneSetup,
    ModelShape,
    estimate_memory,
    load_models,
    model_shape,
)
from qlora_ref.state import BLOCKSIZES, INPUT_DTYPES, QUANT_TYPES
from qlora_ref.text_table import format_table

#: Shape flags: (flag, ModelShape field, type, help).
_SHAPE_FLAGS = (
    ("--hidden-size", "hidden_size", int, "hidden size h"),
    ("--intermediate-size", "intermediate_size", int, "MLP intermediate size"),
    ("--layers", "num_layers", int, "decoder layers"),
    ("--heads", "num_heads", int, "attention heads"),
    ("--kv-heads", "num_kv_heads", int, "key/value heads (default: --heads)"),
    ("--head-dim", "head_dim", int, "head dimension (default: hidden size / heads)"),
    ("--vocab-size", "vocab_size", int, "vocabulary size"),
)
#: Names accepted by --targets besides a comma-separated list.
_TARGET_SETS = {
    "all": "all-linear",
    "all-linear": "all-linear",
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qv": ("q_proj", "v_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def _targets(text: str):
    if text in _TARGET_SETS:
        return _TARGET_SETS[text]
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _model_from_args(args) -> ModelShape:
    overrides = {f: getattr(args, f) for _, f, _, _ in _SHAPE_FLAGS if getattr(args, f) is not None}
    for flag in ("tie_embeddings", "mlp", "norm"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    if args.model:
        base = model_shape(args.model)
        if "num_heads" in overrides and "head_dim" not in overrides:
            overrides["head_dim"] = None  # derive it again from the new head count
        return replace(base, **overrides, name=args.model + (" (modified)" if overrides else ""))
    missing = [flag for flag, f, _, _ in _SHAPE_FLAGS if f in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_size") and f not in overrides]
    if missing:
        raise ValueError(f"give --model NAME, or the shape: missing {' '.join(missing)}")
    overrides.setdefault("num_kv_heads", overrides["num_heads"])
    return ModelShape(name="custom", **overrides)


def _setup_from_args(args) -> FinetuneSetup:
    return FinetuneSetup(
        quant_type=None if args.quant == "none" else args.quant,
        blocksize=args.blocksize,
        double_quant=not args.no_double_quant,
        target_modules=_targets(args.targets),
        rank=args.rank,
        adapter_dtype=args.adapter_dtype,
        optimizer=args.optimizer,
        master_weights=args.master_weights,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        gradient_checkpointing=not args.no_checkpointing,
        compute_dtype=args.compute_dtype,
        base_dtype=args.base_dtype,
        norm_dtype=args.norm_dtype,
        attention=args.attention,
        lora_dropout=args.lora_dropout,
        full_finetune=args.full_finetune,
    )


def list_models() -> str:
    """Return the shipped model shapes as a table."""
    rows = [
        [name, f"{m.num_parameters():,}", m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads, m.num_kv_heads,
         m.head_dim, m.vocab_size, "yes" if m.tie_embeddings else "no", m.mlp, m.source]
        for name, m in load_models().items()
    ]
    return format_table(["model", "parameters", "hidden", "intermediate", "layers", "heads", "kv heads", "head dim",
                         "vocab", "tied", "mlp", "source (config.json)"], rows)


def run(args) -> int:
    """Print the breakdown (or the model list); return the exit status."""
    if args.list_models:
        print(list_models())
        return 0
    breakdown = estimate_memory(_model_from_args(args), _setup_from_args(args))
    print(json.dumps(breakdown.to_dict(), indent=1) if args.json else breakdown.format_table())
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "memory", help="memory of a QLoRA fine-tune: weights, adapters, optimizer, activations",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", help="a shipped model name (see --list-models)")
    p.add_argument("--list-models", action="store_true", help="list the shipped model shapes and exit")
    shape = p.add_argument_group("model shape (overrides --model's fields)")
    for flag, dest, typ, text in _SHAPE_FLAGS:
        shape.add_argument(flag, dest=dest, type=typ, help=text)
    shape.add_argument("--tie-embeddings", dest="tie_embeddings", action="store_true", default=None,
                       help="the output head shares the embedding matrix")
    shape.add_argument("--mlp", choices=("gated", "plain"), help="gated (SwiGLU) or plain MLP (default gated)")
    shape.add_argument("--norm", choices=("rmsnorm", "layernorm"), help="norm kind (default rmsnorm)")
    setup = p.add_argument_group("fine-tuning setup")
    setup.add_argument("--quant", choices=QUANT_TYPES + ("none",), default="nf4", help="base storage; none keeps it 16-bit")
    setup.add_argument("--blocksize", type=int, choices=BLOCKSIZES, default=64)
    setup.add_argument("--no-double-quant", action="store_true", help="keep the absmax in float32")
    setup.add_argument("--targets", default="all",
                       help=f"adapted layers: all, attention, qv, mlp, or a comma list of {','.join(LINEAR_NAMES)}")
    setup.add_argument("--rank", type=int, default=64)
    setup.add_argument("--adapter-dtype", choices=sorted(INPUT_DTYPES), default="bfloat16")
    setup.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="paged_adamw_32bit")
    setup.add_argument("--master-weights", action="store_true", help="keep a float32 copy of trainable parameters")
    setup.add_argument("--batch-size", type=int, default=1)
    setup.add_argument("--seq-len", type=int, default=512)
    setup.add_argument("--no-checkpointing", action="store_true", help="keep every layer's activations")
    setup.add_argument("--compute-dtype", choices=sorted(INPUT_DTYPES), default="bfloat16")
    setup.add_argument("--base-dtype", choices=sorted(INPUT_DTYPES), default="bfloat16",
                       help="dtype of embeddings, head, biases (and linear layers with --quant none)")
    setup.add_argument("--norm-dtype", choices=sorted(INPUT_DTYPES), default="float32")
    setup.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa")
    setup.add_argument("--lora-dropout", action="store_true", help="LoRA dropout is active")
    setup.add_argument("--full-finetune", action="store_true", help="train every parameter (needs --quant none)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
