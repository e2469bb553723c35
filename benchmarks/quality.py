"""Does a 4-bit base cost accuracy? A laptop-sized reproduction of QLoRA's central claim.

A small causal language model (plain torch modules, Llama-style names) is pretrained briefly on
Python source code from the standard library, then fine-tuned on a different domain: English
prose from the Python language reference (``pydoc_data.topics``, shipped with every CPython).
Both texts are on every machine that has Python; nothing is downloaded. Tokens are bytes.

Arms (same data, steps and seeds; nothing is tuned per arm):

========== =====================================================================
base       the pretrained model, not fine-tuned
full       full fine-tuning in float32
lora-bf16  LoRA adapters on a frozen bfloat16 copy of the base
nf4-dq     QLoRA: NF4 base with double quantization (the paper's recipe)
nf4        QLoRA: NF4 base without double quantization
fp4        QLoRA: FP4 base with double quantization
int4       QLoRA: uniform INT4 base with double quantization
========== =====================================================================

The recipe is the QLoRA paper's (appendix B) scaled down: adapters on every linear layer,
``alpha / r = 1/4``, dropout 0.1, AdamW with a constant learning rate, gradient clipping at 0.3.

Run it with ``python -m benchmarks.quality`` (``main``: the command line);
``docs/scripts/quality_pages.py`` makes the tables and figures from the saved JSON.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import pydoc_data.topics as topics
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from qlora_gpu import replace_linear_with_qlora
from qlora_ref.cli.args import ArgumentParser, int_in, writable_file
from qlora_ref.formats.safe_io import write_bytes_atomic
from qlora_ref.text_table import format_table

__all__ = ["SIZES", "ARMS", "ExperimentConfig", "TinyLM", "load_corpora", "run_experiment"]

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExperimentConfig:
    """Sizes and the (shared) recipe of one run."""

    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_ff: int = 384
    seq_len: int = 128
    batch_size: int = 8
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    finetune_steps: int = 100
    lr: float = 1e-3
    rank: int = 16
    alpha: float = 4.0  # alpha / r = 1/4, as the paper's r = 64, alpha = 16
    dropout: float = 0.1
    max_grad_norm: float = 0.3
    blocksize: int = 64
    eval_batches: int = 8
    eval_every: int = 20
    seeds: tuple = (0, 1, 2)
    compute_dtype: str = "float32"


#: Named sizes: ``tiny`` for the CI smoke test, ``default`` for this 2-core machine (about
#: 10 minutes), ``large`` for a GPU.
SIZES = {
    "tiny": ExperimentConfig(d_model=64, n_layer=1, n_head=2, d_ff=128, seq_len=32, batch_size=4,
                             pretrain_steps=40, finetune_steps=30, eval_batches=8, eval_every=10,
                             seeds=(0,), rank=4, alpha=1.0),
    "default": ExperimentConfig(),
    "large": ExperimentConfig(d_model=512, n_layer=8, n_head=8, d_ff=1408, seq_len=256, batch_size=32,
                              pretrain_steps=4000, pretrain_lr=1e-3, finetune_steps=1000, lr=2e-4,
                              rank=64, alpha=16.0, eval_batches=64, eval_every=50,
                              compute_dtype="bfloat16"),
}

ARMS = ("base", "full", "lora-bf16", "nf4-dq", "nf4", "fp4", "int4")
_QUANTIZED_ARMS = {"nf4-dq": ("nf4", True), "nf4": ("nf4", False), "fp4": ("fp4", True), "int4": ("int4", True)}


# ----------------------------------------------------------------------------- data

def load_corpora(max_pretrain_bytes: int = 4_000_000) -> dict:
    """Return the two byte corpora as uint8 tensors.

    ``pretrain``: the standard library's top-level ``*.py`` files, sorted by name, concatenated.
    ``finetune`` / ``heldout``: the language reference text of ``pydoc_data.topics`` in sorted key
    order, split 90/10 (the held-out tail is never trained on).
    """

    lib = Path(sysconfig.get_paths()["stdlib"])
    code = bytearray()
    for path in sorted(lib.glob("*.py")):
        code += path.read_bytes()
        if len(code) >= max_pretrain_bytes:
            break
    prose = "\n\n".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")
    split = int(len(prose) * 0.9)
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).clone()  # noqa: E731
    return {"pretrain": as_tensor(code), "finetune": as_tensor(prose[:split]), "heldout": as_tensor(prose[split:])}


def sample_batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Random windows: inputs ``(batch, seq_len)`` int64 and next-byte targets of the same shape."""
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]  # (batch, seq_len + 1)
    window = data[idx].long()
    return window[:, :-1], window[:, 1:]


def eval_batches(data: torch.Tensor, n_batches: int, batch_size: int, seq_len: int):
    """Fixed, evenly spaced, non-random evaluation windows (the same for every arm)."""
    n = n_batches * batch_size
    starts = torch.linspace(0, data.numel() - seq_len - 2, n).long()
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    window = data[idx].long().view(n_batches, batch_size, seq_len + 1)
    return [(w[:, :-1], w[:, 1:]) for w in window]


# ----------------------------------------------------------------------------- model

class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        heads = lambda y: y.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)  # noqa: E731 (b, h, t, d_h)
        y = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """SwiGLU, as in Llama: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ExperimentConfig):
        super().__init__()
        self.input_norm = nn.RMSNorm(cfg.d_model)
        self.self_attn = Attention(cfg.d_model, cfg.n_head)
        self.post_attention_norm = nn.RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.d_ff)

    def forward(self, x):
        x = x + self.self_attn(self.input_norm(x))
        return x + self.mlp(self.post_attention_norm(x))


class TinyLM(nn.Module):
    """A byte-level causal LM: embeddings, pre-norm blocks, tied output head."""

    def __init__(self, cfg: ExperimentConfig, vocab: int = 256):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, cfg.d_model)
        self.embed_positions = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens):  # tokens (batch, t) -> logits (batch, t, vocab)
        t = tokens.shape[1]
        x = self.embed_tokens(tokens) + self.embed_positions(torch.arange(t, device=tokens.device))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x) @ self.embed_tokens.weight.T


def loss_on(model, batches) -> float:
    """Mean next-byte cross-entropy (nats) over fixed batches."""
    model.eval()
    with torch.no_grad():
        total = sum(F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).item() for x, y in batches)
    model.train()
    return total / len(batches)


# ----------------------------------------------------------------------------- arms

class DenseLoRALinear(nn.Module):
    """The ``lora-bf16`` control arm: LoRA adapters on a frozen bfloat16 copy of a weight.

    ``y = x W_bf16^T + s * dropout(x) A^T B^T`` with the matmuls in ``compute_dtype``.
    """

    def __init__(self, linear: nn.Linear, r: int, alpha: float, dropout: float, compute_dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16))  # frozen (out, in)
        self.lora_A = nn.Parameter(torch.empty(r, linear.in_features))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, r))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's initialisation
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.compute_dtype = compute_dtype

    def forward(self, x):
        base = F.linear(x.to(self.compute_dtype), self.weight.to(self.compute_dtype)).to(x.dtype)
        return base + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)


def _replace_linears(model: nn.Module, make) -> None:
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in TARGET_MODULES:
                setattr(module, child_name, make(child))


def build_arm(arm: str, pretrained: dict, cfg: ExperimentConfig) -> nn.Module:
    """Return the model of one arm, starting from the pretrained weights.

    Everything but the adapters is frozen in the adapter arms (embeddings and norms included, as
    in QLoRA).
    """
    model = TinyLM(cfg)
    model.load_state_dict(pretrained)
    compute_dtype = getattr(torch, cfg.compute_dtype)
    if arm in ("base", "full"):
        return model
    for p in model.parameters():
        p.requires_grad_(False)
    if arm == "lora-bf16":
        _replace_linears(model, lambda lin: DenseLoRALinear(lin, cfg.rank, cfg.alpha, cfg.dropout, compute_dtype))
        return model
    if arm not in _QUANTIZED_ARMS:
        raise ValueError(f"unknown arm {arm!r}; expected one of {ARMS}")
    quant_type, double_quant = _QUANTIZED_ARMS[arm]
    replace_linear_with_qlora(
        model, target_modules=list(TARGET_MODULES), r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
        quant_type=quant_type, double_quant=double_quant, blocksize=cfg.blocksize,
        compute_dtype=compute_dtype,
    )
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model stores (4-bit bases with their constants)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def base_weight_error(model: nn.Module, pretrained: dict) -> float:
    """Mean over target layers of ``||W_used - W||_F / ||W||_F``: what the base format costs."""
    errors = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in TARGET_MODULES:
            continue
        w = pretrained[f"{name}.weight"].double()
        if isinstance(module, nn.Linear):
            used = module.weight.detach().double()
        elif isinstance(module, DenseLoRALinear):
            used = module.weight.double()
        else:  # a QLoRA layer: its decoded base weight
            used = module.dequantized_weight(torch.float32).double()
        errors.append(float(torch.linalg.norm(used - w) / torch.linalg.norm(w)))
    return sum(errors) / len(errors)


# ----------------------------------------------------------------------------- training

def _train(model, data, cfg: ExperimentConfig, *, steps: int, lr: float, seed: int, eval_set=None, progress=None):
    """AdamW, constant learning rate, gradient clipping; returns the held-out loss curve."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    curve, train_losses = [], []
    if eval_set is not None:
        curve.append((0, loss_on(model, eval_set)))
    model.train()
    for step in range(1, steps + 1):
        x, y = sample_batch(data, cfg.batch_size, cfg.seq_len, generator)
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        train_losses.append(loss.item())
        if eval_set is not None and (step % cfg.eval_every == 0 or step == steps):
            curve.append((step, loss_on(model, eval_set)))
        if progress and step % max(1, steps // 10) == 0:
            progress(f"    step {step}/{steps}  train loss {loss.item():.3f}")
    return curve, train_losses


def pretrain(cfg: ExperimentConfig, corpora: dict, *, seed: int = 1234, progress=None) -> tuple[dict, list]:
    """Pretrain the base model on code; returns its state dict and the training losses."""
    torch.manual_seed(seed)
    model = TinyLM(cfg)
    _, losses = _train(model, corpora["pretrain"], cfg, steps=cfg.pretrain_steps,
                       lr=cfg.pretrain_lr, seed=seed, progress=progress)
    return copy.deepcopy(model.state_dict()), losses


def run_experiment(size: str = "default", *, arms=ARMS, progress=print, config: ExperimentConfig | None = None,
                   threads: int = 1) -> dict:
    """Run every arm over every seed; return a JSON-ready dict of results.

    Parameters
    ----------
    size : {"tiny", "default", "large"}
    arms : sequence of str
        A subset of ``ARMS``.
    progress : callable or None
        Called with one line of text at each milestone.
    config : ExperimentConfig, optional
        Overrides ``SIZES[size]``.
    threads : int
        torch intra-op threads (1 by default: the model's matmuls are small, and one thread
        keeps runs reproducible and fast on a shared machine).
    """
    if config is None:
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
        config = SIZES[size]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; expected a subset of {ARMS}")
    say = progress or (lambda _: None)
    torch.set_num_threads(threads)
    corpora = load_corpora()
    heldout = eval_batches(corpora["heldout"], config.eval_batches, config.batch_size, config.seq_len)
    pre_code = eval_batches(corpora["pretrain"], config.eval_batches, config.batch_size, config.seq_len)
    t0 = time.perf_counter()
    say(f"pretraining on {corpora['pretrain'].numel()} bytes of stdlib code ({config.pretrain_steps} steps)")
    pretrained, pretrain_losses = pretrain(config, corpora, progress=progress)
    pretrain_s = time.perf_counter() - t0
    results = {
        "size": size, "config": asdict(config), "arms": {},
        "pretrain": {"wall_s": pretrain_s, "final_train_loss": pretrain_losses[-1]},
        "data": {k: int(v.numel()) for k, v in corpora.items()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    for arm in arms:
        runs = []
        weight_error = None
        for seed in config.seeds:
            torch.manual_seed(seed)
            model = build_arm(arm, pretrained, config)
            if weight_error is None:  # what the base format costs, before any training
                weight_error = base_weight_error(model, pretrained)
            t = time.perf_counter()
            if arm == "base":
                curve = [(0, loss_on(model, heldout))]
            else:
                curve, _ = _train(model, corpora["finetune"], config, steps=config.finetune_steps,
                                  lr=config.lr, seed=seed, eval_set=heldout)
            runs.append({
                "seed": seed, "curve": curve, "heldout_loss": curve[-1][1],
                "code_loss": loss_on(model, pre_code), "wall_s": time.perf_counter() - t,
            })
            say(f"  {arm:9s} seed {seed}: held-out loss {curve[-1][1]:.4f}  ({runs[-1]['wall_s']:.1f} s)")
            if arm == "base":
                break  # deterministic: one evaluation is enough
        losses = torch.tensor([r["heldout_loss"] for r in runs], dtype=torch.float64)
        results["arms"][arm] = {
            "runs": runs,
            "heldout_loss_mean": float(losses.mean()),
            "heldout_loss_std": float(losses.std()) if len(runs) > 1 else 0.0,
            "heldout_loss_before_mean": sum(r["curve"][0][1] for r in runs) / len(runs),
            "perplexity_mean": float(torch.exp(losses).mean()),
            "base_weight_error": weight_error,
            "trainable_parameters": trainable_parameters(model) if arm != "base" else 0,
            "stored_bytes": stored_bytes(model),
            "wall_s_mean": sum(r["wall_s"] for r in runs) / len(runs),
        }
    results["total_wall_s"] = time.perf_counter() - t0
    return results


def save_results(results: dict, path) -> Path:
    """Write results as JSON (sorted keys, stable formatting)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, (json.dumps(results, indent=1, sort_keys=True) + "\n").encode())  # temp + rename
    return path


def summary_table(results: dict) -> str:
    """Format the per-arm summary of an experiment's results as a text table."""
    rows = []
    for arm, r in results["arms"].items():
        rows.append([
            arm,
            f"{r['heldout_loss_before_mean']:.4f}",
            f"{r['heldout_loss_mean']:.4f}",
            f"{r['heldout_loss_std']:.4f}",
            f"{r['perplexity_mean']:.3f}",
            f"{r['base_weight_error']:.4f}",
            r["trainable_parameters"],
            r["stored_bytes"],
            f"{r['wall_s_mean']:.1f}",
        ])
    return format_table(
        ["arm", "loss before", "held-out loss", "std", "perplexity", "base rel. error", "trainable", "stored bytes", "wall s"],
        rows,
        title=f"Fine-tuning on held-out prose, size {results['size']}, seeds {list(results['config']['seeds'])}",
    )


def main(argv=None) -> int:
    """``python -m benchmarks.quality``: run the experiment, print the table, save the JSON."""
    p = ArgumentParser(prog="python -m benchmarks.quality",
                                description="Fine-tune a small LM with a 4-bit base (NF4/FP4/INT4) vs LoRA "
                                            "and full fine-tuning.")
    p.add_argument("--size", default="default", choices=["tiny", "default", "large"],
                   help="tiny: seconds (smoke test); default: about 10 minutes on 2 CPU cores; large: a GPU")
    p.add_argument("--arms", default="", help="comma-separated subset of arms (default: all)")
    p.add_argument("--out", type=writable_file, default="",
                   help="write the results as JSON to this path (checked writable before the run)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--threads", type=int_in(1, 1024), default=1, help="torch intra-op threads (default 1)")
    args = p.parse_args(argv)
    arms = args.arms.split(",") if args.arms else ARMS
    results = run_experiment(args.size, arms=arms, progress=None if args.quiet else print, threads=args.threads)
    if args.out:
        print(f"saved {save_results(results, args.out)}")
    print(summary_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
