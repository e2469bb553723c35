"""Measured peak of live tensor bytes in one real QLoRA training step, on CPU, against the calculator.

Pairs with ``qlora_ref.memory`` (``estimate_memory``: Note: the model of memory) and
``qlora_ref.memory.activations`` (Note: the peak of a training step). The calculator is a formula;
this module runs the thing it describes and counts bytes:

- a small real transformers model (Llama with grouped-query attention, or Qwen2 with its q/k/v
  biases), its linear layers stored in NF4 with double quantization, LoRA adapters on all seven
  projections, in one of two forms: bitsandbytes' ``Linear4bit`` loaded by
  ``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` with PEFT's ``get_peft_model``
  (``"bnb-peft"``), or ``qlora_gpu.replace_linear_with_qlora`` (``"qlora_gpu"``);
- one training step: forward with labels (transformers' own loss), backward, ``optimizer.step()``;
- ``LiveTensorBytes``, a ``TorchDispatchMode`` that sees every tensor an operator returns, follows
  its storage until it is freed (a ``weakref.finalize`` on the storage) and keeps the running sum
  and its peak, starting from the storages that exist before the step (weights, quantization
  state, adapters, the token batch).

Note: what the measurement sees
    Storages returned by an operator, i.e. tensors: what ``torch.cuda.max_memory_allocated``
    counts on a GPU, less the caching allocator's rounding to 512-byte blocks. Scratch memory an
    operator's kernel allocates and frees inside itself (a fused attention kernel's workspace,
    bitsandbytes' dequantized weight inside its ``gemm_4bit`` operator) is not a tensor the
    step holds and is not seen; nor is memory a library allocates outside torch (oneDNN
    primitives' caches). The step runs with the compute paths forced to ones every CPU has
    (bitsandbytes' AVX512-BF16 repacking switched off), so the numbers are the same on AVX2 and
    AVX-512 machines.

Run ``python -m benchmarks.memory_measure`` for the full grid; it writes
``benchmarks/results/memory_measured.json`` and the docs fragment
``docs/generated/memory_measured.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import qlora_gpu
from qlora_ref.memory import FinetuneSetup, estimate_memory, shape_from_config

__all__ = ["LiveTensorBytes", "StepCase", "measure_step", "calculated_peak_bytes", "ARCHITECTURES", "IMPLEMENTATIONS"]

#: Layer implementations measured.
IMPLEMENTATIONS = ("bnb-peft", "qlora_gpu")


class LiveTensorBytes(TorchDispatchMode):
    """Running sum and peak of the bytes of live storages, counted once per storage.

    Storages that exist before the mode is entered are added with ``track``; every storage an
    operator returns while the mode is active is added when first seen and removed when it is freed.

    Attributes
    ----------
    live_bytes, peak_bytes : int
    phase : str
        Set by the caller ("forward", "backward", "optimizer"); ``peak_phase`` is the phase in
        which ``peak_bytes`` was reached.
    """

    def __init__(self):
        super().__init__()
        self._live = {}  # storage data_ptr -> nbytes
        self._made_by = {}  # storage data_ptr -> (operator, phase), for ``peak_storages``
        self.peak_storages = []
        self.record_peak = False
        self._op = "before"
        self.live_bytes = 0
        self.peak_bytes = 0
        self.phase = "before"
        self.peak_phase = "before"

    def track(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage (once) until it is freed."""
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self._live:
            return
        self._live[key] = nbytes
        self.live_bytes += nbytes
        self._made_by[key] = (self._op, self.phase, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_phase = self.live_bytes, self.phase
            if self.record_peak:
                self.peak_storages = [(n,) + self._made_by[k] for k, n in self._live.items()]
        weakref.finalize(storage, self._free, key)

    def _free(self, key) -> None:
        self.live_bytes -= self._live.pop(key)
        self._made_by.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._op = str(func)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.track(t)
        return out


#: Small configs of two families, with their real modeling code: transformers' config kwargs and
#: the facts ``ModelShape`` takes from the modeling code (MLP kind, norm kind, biases).
ARCHITECTURES = {
    "llama": ("LlamaConfig", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=8,
                                  num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False),
              dict(mlp="gated", norm="rmsnorm", bias=())),
    "qwen2": ("Qwen2Config", dict(hidden_size=256, intermediate_size=704, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False),
              dict(mlp="gated", norm="rmsnorm", bias=("q_proj", "k_proj", "v_proj"))),
}

_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class StepCase:
    """One measured training step: architecture, layer implementation, batch and the setup knobs."""

    architecture: str
    implementation: str
    batch_size: int
    seq_len: int
    rank: int = 16
    adapter_dtype: str = "float32"
    gradient_checkpointing: bool = True
    optimizer: str = "adamw_torch"
    vocab_size: int | None = None  # overrides the architecture's (a small one moves the peak off the loss)

    def config(self):
        import transformers  # noqa: PLC0415  (optional dependency: only the measurement needs it)

        cls_name, kwargs, arch = ARCHITECTURES[self.architecture]
        kwargs = dict(kwargs, max_position_embeddings=max(4096, self.seq_len))
        if self.vocab_size is not None:
            kwargs["vocab_size"] = self.vocab_size
        return getattr(transformers, cls_name)(**kwargs), arch

    def setup(self) -> FinetuneSetup:
        """The calculator's description of this step."""
        return FinetuneSetup(rank=self.rank, adapter_dtype=self.adapter_dtype, optimizer=self.optimizer,
                             batch_size=self.batch_size, seq_len=self.seq_len, base_dtype="bfloat16",
                             norm_dtype="bfloat16", gradient_checkpointing=self.gradient_checkpointing,
                             lora_layer="peft" if self.implementation == "bnb-peft" else "fused")


def _build_model(case: StepCase, folder: str):
    """The model in QLoRA form, in training mode, only the adapters trainable."""
    import transformers  # noqa: PLC0415  (optional dependency)

    config, _ = case.config()
    torch.manual_seed(0)
    dtype = getattr(torch, case.adapter_dtype)
    if case.implementation == "bnb-peft":
        import bitsandbytes as bnb  # noqa: PLC0415  (optional dependency)
        import peft  # noqa: PLC0415  (optional dependency)

        transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
        quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization,
                                                                  dtype=torch.bfloat16, device_map="cpu")
        for module in model.modules():  # the path every CPU has (Note: what the measurement sees)
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
        lora = peft.LoraConfig(r=case.rank, lora_alpha=2 * case.rank, target_modules=_TARGETS, lora_dropout=0.0)
        # PEFT's default (autocast_adapter_dtype=True) keeps the adapters in float32.
        model = peft.get_peft_model(model, lora, autocast_adapter_dtype=case.adapter_dtype == "float32")
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(dtype)
    elif case.implementation == "qlora_gpu":
        model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
        qlora_gpu.replace_linear_with_qlora(model, _TARGETS, r=case.rank, alpha=2 * case.rank, quant_type="nf4",
                                            blocksize=64, double_quant=True, compute_dtype=torch.bfloat16,
                                            adapter_dtype=dtype)
    else:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {case.implementation!r}")
    if case.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    return model


def _model_tensors(model):
    """Every tensor the model holds: parameters, buffers, and bitsandbytes' quantization state."""
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code] + ([state.offset, state.state2.absmax, state.state2.code]
                                                     if state.nested else [])
    return tensors


def _optimizer(case: StepCase, params):
    if case.optimizer == "adamw_torch":
        return torch.optim.AdamW(params, lr=1e-4)
    import bitsandbytes as bnb  # noqa: PLC0415  (optional dependency)

    return {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[case.optimizer](params)


def measure_step(case: StepCase, *, record_peak: bool = False) -> dict:
    """Run two training steps of ``case`` and return the measured peak of live tensor bytes of the second.

    The first step allocates the optimizer state; the second is what every later step of a run
    looks like (gradients set to None between steps, as ``optimizer.zero_grad()`` does).

    Returns
    -------
    dict
        ``{"before_bytes", "peak_bytes", "peak_phase"}``: the storages held before the step
        (model, quantization state, adapters, optimizer state, tokens) and the peak during
        forward, loss, backward and optimizer step; with ``record_peak`` also ``"peak_storages"``,
        ``(nbytes, operator, phase)`` of every storage live at the peak.
    """
    config, _ = case.config()
    with tempfile.TemporaryDirectory() as folder:
        model = _build_model(case, folder)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(case, params)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (case.batch_size, case.seq_len), generator=generator)
    labels = ids.clone()  # a data collator hands the model its own labels tensor
    model(input_ids=ids, labels=labels).loss.backward()  # the first step: allocates the optimizer state
    opt.step()
    opt.zero_grad(set_to_none=True)
    tracker = LiveTensorBytes()
    tracker.record_peak = record_peak
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    for t in _model_tensors(model) + state + [ids, labels]:
        tracker.track(t)
    before = tracker.live_bytes
    with tracker:
        tracker.phase = "forward"
        loss = model(input_ids=ids, labels=labels).loss
        tracker.phase = "backward"
        loss.backward()
        del loss
        tracker.phase = "optimizer"
        opt.step()
    out = {"before_bytes": before, "peak_bytes": tracker.peak_bytes, "peak_phase": tracker.peak_phase}
    if record_peak:
        out["peak_storages"] = tracker.peak_storages
    return out


def calculated_peak_bytes(case: StepCase) -> int:
    """The calculator's peak for ``case``: ``estimate_memory(...).total_bytes`` plus the token batch."""
    config, arch = case.config()
    shape = shape_from_config(case.architecture, config.to_dict(), arch)
    return estimate_memory(shape, case.setup()).total_bytes


#: (vocabulary override, [(batch, seq), ...], checkpointing settings). The architectures' own
#: vocabulary puts the peak in the loss; a small one moves it into a decoder layer's backward
#: (measured with checkpointing on, where the recomputed layer adds to it; listed first).
FULL_GRID = ((256, ((2, 512), (2, 1024)), (True,)), (None, ((1, 256), (2, 512)), (True, False)))


def compare(case: StepCase) -> dict:
    """Measure ``case`` and set the calculator beside it: one row of the comparison table."""
    measured = measure_step(case)
    config, arch = case.config()
    breakdown = estimate_memory(shape_from_config(case.architecture, config.to_dict(), arch), case.setup())
    return {
        "architecture": case.architecture, "implementation": case.implementation,
        "vocab_size": config.vocab_size, "adapter_dtype": case.adapter_dtype,
        "gradient_checkpointing": case.gradient_checkpointing, "batch_size": case.batch_size,
        "seq_len": case.seq_len, "tokens": case.batch_size * case.seq_len,
        "measured_bytes": measured["peak_bytes"], "calculated_bytes": breakdown.total_bytes,
        "calculated_phase": breakdown.peak_phase,
        "error": breakdown.total_bytes / measured["peak_bytes"] - 1.0,
    }


def slope_errors(rows: list) -> list:
    """Per-token slopes between successive token counts of one configuration, measured and calculated.

    Returns
    -------
    list of dict
        One per pair of rows that differ only in tokens: ``measured`` and ``calculated`` bytes per
        token, and ``error`` (calculated / measured - 1).
    """
    def key(row):
        return tuple(row[k] for k in ("architecture", "implementation", "vocab_size", "adapter_dtype",
                                      "gradient_checkpointing"))

    groups = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    out = []
    for k, group in groups.items():
        group = sorted(group, key=lambda r: r["tokens"])
        for lo, hi in zip(group, group[1:]):
            dt = hi["tokens"] - lo["tokens"]
            if dt == 0:
                continue
            measured = (hi["measured_bytes"] - lo["measured_bytes"]) / dt
            calculated = (hi["calculated_bytes"] - lo["calculated_bytes"]) / dt
            out.append({"configuration": k, "tokens": (lo["tokens"], hi["tokens"]), "measured": measured,
                        "calculated": calculated, "error": calculated / measured - 1.0})
    return out


def grid_cases(grid=FULL_GRID, architectures=tuple(ARCHITECTURES), implementations=IMPLEMENTATIONS,
               adapter_dtypes=("float32", "bfloat16")) -> list:
    """The ``StepCase`` of every grid point."""
    return [StepCase(arch, impl, b, s, adapter_dtype=dtype, gradient_checkpointing=ckpt, vocab_size=vocab)
            for vocab, points, checkpointing in grid for dtype in adapter_dtypes for ckpt in checkpointing
            for arch in architectures for impl in implementations for b, s in points]


def format_markdown(rows: list, slopes: list) -> str:
    """The docs fragment: one row per grid point, then the worst errors."""
    lines = ["| model | vocab | layers | adapters | checkpointing | batch x seq | measured | calculator | "
             "error | peak phase |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['architecture']} | {r['vocab_size']} | {r['implementation']} | {r['adapter_dtype']} | "
                     f"{'on' if r['gradient_checkpointing'] else 'off'} | {r['batch_size']} x {r['seq_len']} | "
                     f"{r['measured_bytes']:,} | {r['calculated_bytes']:,} | {100 * r['error']:+.3f}% | "
                     f"{r['calculated_phase']} |")
    worst = max(rows, key=lambda r: abs(r["error"]))
    worst_slope = max(slopes, key=lambda s: abs(s["error"]))
    lines += ["", f"Worst peak error {100 * worst['error']:+.3f}% ({worst['architecture']}, {worst['implementation']}, "
              f"vocab {worst['vocab_size']}, {worst['adapter_dtype']} adapters, checkpointing "
              f"{'on' if worst['gradient_checkpointing'] else 'off'}, {worst['batch_size']} x {worst['seq_len']}); "
              f"{sum(abs(r['error']) <= 0.03 for r in rows)} of {len(rows)} points within 3%. Worst per-token slope "
              f"error {100 * worst_slope['error']:+.3f}% (measured {worst_slope['measured']:,.1f}, calculated "
              f"{worst_slope['calculated']:,.1f} bytes per token, {worst_slope['configuration'][0]}, "
              f"{worst_slope['configuration'][1]}, tokens {worst_slope['tokens'][0]} -> {worst_slope['tokens'][1]}); "
              f"{sum(abs(s['error']) <= 0.03 for s in slopes)} of {len(slopes)} slopes within 3%."]
    return "\n".join(lines) + "\n"


def _row_key(row: dict) -> tuple:
    return tuple(row[k] for k in ("architecture", "implementation", "vocab_size", "adapter_dtype",
                                  "gradient_checkpointing", "batch_size", "seq_len"))


def _write(path_json: str, path_md: str, rows: list) -> None:
    slopes = slope_errors(rows)
    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    with open(path_json, "w", encoding="utf-8") as f:
        json.dump({"versions": versions, "rows": rows,
                   "slopes": [dict(s, configuration=list(s["configuration"]), tokens=list(s["tokens"])) for s in slopes]},
                  f, indent=1)
    if slopes:
        with open(path_md, "w", encoding="utf-8") as f:
            f.write(format_markdown(rows, slopes))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="benchmarks/results/memory_measured.json", help="results file to write")
    parser.add_argument("--markdown", default="docs/generated/memory_measured.md", help="docs fragment to write")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --json, measure the rest")
    args = parser.parse_args(argv)
    rows = []
    if args.resume:
        with contextlib.suppress(FileNotFoundError), open(args.json, encoding="utf-8") as f:
            rows = json.load(f)["rows"]
    done = {_row_key(r) for r in rows}
    for case in grid_cases():
        config, _ = case.config()
        compare_key = (case.architecture, case.implementation, config.vocab_size, case.adapter_dtype,
                       case.gradient_checkpointing, case.batch_size, case.seq_len)
        if compare_key in done:
            continue
        row = compare(case)
        rows.append(row)
        print(f"{row['architecture']:6} {row['implementation']:9} V={row['vocab_size']:5} {row['adapter_dtype']:8} "
              f"ckpt={row['gradient_checkpointing']!s:5} {row['batch_size']}x{row['seq_len']:<5} measured "
              f"{row['measured_bytes']:>11,} calculated {row['calculated_bytes']:>11,} {100 * row['error']:+.3f}%",
              flush=True)
        _write(args.json, args.markdown, rows)  # after every row: a long run can be resumed
    _write(args.json, args.markdown, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
