"""``qlora-ref memory``: will a QLoRA fine-tune fit, and what takes the memory (``qlora_ref.memory``).

A model is named (``--model llama-2-70b``; ``--list-models`` shows the shipped ones) or given
by shape flags (``--hidden-size`` ...); shape flags given with ``--model`` override its fields.
Setup flags default to the QLoRA paper's recipe. ``--gpu 24GB`` adds a verdict, the margin and the
largest micro-batch per sequence length that fits (``qlora_ref.memory.fit``). ``--json`` prints
the same as JSON, numbers as numbers.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from qlora_ref.memory import (
    LINEAR_NAMES,
    LORA_LAYERS,
    OPTIMIZERS,
    FinetuneSetup,
    ModelShape,
    estimate_memory,
    load_models,
    model_shape,
)
from qlora_ref.memory.fit import RESERVE_BYTES, fit_verdict, largest_fits, parse_size
from qlora_ref.memory.model import format_bytes
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
    if args.full_finetune and args.quant != "none":
        raise ValueError("--full-finetune trains the base weights, which cannot stay 4-bit: add --quant none")
    if args.gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {args.gpus}")
    for flag, value in (("--rank", args.rank), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len),
                        ("--loss-chunk-tokens", args.loss_chunk_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
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
        lora_layer=args.lora_layer,
        loss_chunk_tokens=args.loss_chunk_tokens,
        num_gpus=args.gpus,
        cpu_offload=args.cpu_offload,
    )


def format_fit(verdict: dict, fits: list, *, num_gpus: int) -> str:
    """The verdict, its margin, and the sweep of ``largest_fits`` as text."""
    gpus = f"{num_gpus} x " if num_gpus > 1 else ""
    word = "FITS" if verdict["fits"] else "DOES NOT FIT"
    margin = verdict["margin_bytes"]
    lines = [f"Verdict: {word} on {gpus}{format_bytes(verdict['gpu_bytes'])}: peak {format_bytes(verdict['resident_bytes'])}"
             + (f" (+ {format_bytes(verdict['paged_bytes'])} paged optimizer state, evictable to CPU RAM)"
                if verdict["paged_bytes"] else "")
             + f" in '{verdict['peak_phase']}' + {format_bytes(verdict['reserve_bytes'])} reserve (CUDA context, "
             f"allocator); margin {'+' if margin >= 0 else '-'}{format_bytes(abs(margin))} per GPU"
             + (f"; {format_bytes(verdict['cpu_bytes'])} offloaded to CPU RAM per GPU" if verdict["cpu_bytes"] else "")]
    rows = [["on" if r["gradient_checkpointing"] else "off", r["seq_len"], r["batch_size"] or "none",
             r["tokens"] or "", format_bytes(r["resident_bytes"]) if r["resident_bytes"] is not None else "",
             format_bytes(r["margin_bytes"]) if r["margin_bytes"] is not None else ""] for r in fits]
    lines.append(format_table(["checkpointing", "seq len", "largest batch", "tokens", "peak", "margin"], rows,
                              title="Largest micro-batch that fits, per sequence length"))
    return "\n".join(lines)


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
    """Print the breakdown (or the model list), and with ``--gpu`` the verdict; return the exit status."""
    if args.list_models:
        print(list_models())
        return 0
    model = _model_from_args(args)
    setup = _setup_from_args(args)
    breakdown = estimate_memory(model, setup)
    gpu_bytes = parse_size(args.gpu, "--gpu") if args.gpu is not None else None
    reserve = parse_size(args.reserve, "--reserve")
    if gpu_bytes is not None and reserve >= gpu_bytes:
        raise ValueError(f"--reserve {args.reserve} leaves nothing of --gpu {args.gpu}")
    verdict = fits = None
    if gpu_bytes is not None:
        verdict = fit_verdict(model, setup, gpu_bytes, reserve_bytes=reserve)
        fits = largest_fits(model, setup, gpu_bytes, reserve_bytes=reserve)
    if args.json:
        out = breakdown.to_dict()
        if verdict is not None:
            out["fit"] = dict(verdict, largest_fits=fits)
        print(json.dumps(out, indent=1))
    else:
        print(breakdown.format_table())
        if verdict is not None:
            print()
            print(format_fit(verdict, fits, num_gpus=setup.num_gpus))
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default only when it has a real one (not None, not a switch's False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "memory", help="will a QLoRA fine-tune fit a GPU: memory of weights, adapters, optimizer, activations",
        description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", help="a shipped model name (see --list-models)")
    p.add_argument("--list-models", action="store_true", help="list the shipped model shapes and exit")
    shape = p.add_argument_group("model shape (overrides --model's fields)")
    for flag, dest, typ, text in _SHAPE_FLAGS:
        shape.add_argument(flag, dest=dest, type=typ, help=text)
    shape.add_argument("--tie-embeddings", dest="tie_embeddings", action="store_true", default=None,
                       help="the output head shares the embedding matrix")
    shape.add_argument("--mlp", choices=("gated", "plain"), help="gated (SwiGLU) or plain MLP (a new shape: gated)")
    shape.add_argument("--norm", choices=("rmsnorm", "layernorm"), help="norm kind (a new shape: rmsnorm)")
    fit = p.add_argument_group("will it fit")
    fit.add_argument("--gpu", metavar="SIZE", help="memory of each GPU, e.g. 24GB, 48GB, 80GB (GB read as GiB, as "
                     "cards are labelled): prints a verdict, the margin and the largest batch per sequence length")
    fit.add_argument("--gpus", type=int, default=1, help="GPUs; above 1 FSDP shards weights, adapters, gradients "
                     "and optimizer state over them, each GPU running its own micro-batch")
    fit.add_argument("--cpu-offload", action="store_true", help="FSDP's CPU offload: parameters, gradients and "
                     "optimizer state in CPU RAM")
    fit.add_argument("--reserve", metavar="SIZE", default=f"{RESERVE_BYTES // 2**30}GiB",
                     help="per GPU, set apart for the CUDA context and the caching allocator")
    setup = p.add_argument_group("fine-tuning setup")
    setup.add_argument("--quant", choices=QUANT_TYPES + ("none",), default="nf4", help="base storage; none keeps it 16-bit")
    setup.add_argument("--blocksize", type=int, choices=BLOCKSIZES, default=64, help="values per absmax block")
    setup.add_argument("--no-double-quant", action="store_true", help="keep the absmax in float32")
    setup.add_argument("--targets", default="all",
                       help=f"adapted layers: all, attention, qv, mlp, or a comma list of {','.join(LINEAR_NAMES)}")
    setup.add_argument("--rank", type=int, default=64, help="LoRA rank r")
    setup.add_argument("--adapter-dtype", choices=sorted(INPUT_DTYPES), default="bfloat16",
                       help="dtype of the adapters; PEFT's get_peft_model keeps them in float32 unless "
                            "autocast_adapter_dtype=False")
    setup.add_argument("--lora-layer", choices=LORA_LAYERS, default="peft",
                       help="peft: PEFT's LoRA layer around the 4-bit base; fused: one autograd function "
                            "(qlora_gpu's QLoRALinear), which keeps less")
    setup.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="paged_adamw_32bit",
                       help="adamw_torch: torch's AdamW; the rest bitsandbytes' (paged_: state in unified memory)")
    setup.add_argument("--master-weights", action="store_true", help="keep a float32 copy of trainable parameters")
    setup.add_argument("--batch-size", type=int, default=1, help="micro-batch per GPU")
    setup.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    setup.add_argument("--no-checkpointing", action="store_true", help="keep every layer's activations")
    setup.add_argument("--loss-chunk-tokens", type=int, metavar="N",
                       help="a fused chunked cross-entropy over N tokens at a time (default: the loss as "
                            "transformers computes it, on float32 logits of every token)")
    setup.add_argument("--compute-dtype", choices=sorted(INPUT_DTYPES), default="bfloat16",
                       help="dtype of the matmuls and activations")
    setup.add_argument("--base-dtype", choices=sorted(INPUT_DTYPES), default="bfloat16",
                       help="dtype of embeddings, head, biases (and linear layers with --quant none)")
    setup.add_argument("--norm-dtype", choices=sorted(INPUT_DTYPES), default="float32", help="dtype of norm weights")
    setup.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa",
                       help="sdpa keeps no attention scores; eager keeps two copies")
    setup.add_argument("--lora-dropout", action="store_true", help="LoRA dropout is active")
    setup.add_argument("--full-finetune", action="store_true", help="train every parameter (needs --quant none)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
