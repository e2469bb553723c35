"""Memory cases: stored bytes of every 4-bit format, and one layer's forward+backward memory.

Pairs with ``qlora_ref.memory`` (``quantized_tensor_nbytes``: the formula of one stored tensor;
Note: the model of memory) and ``qlora_ref.memory.activations`` (Note: activations kept for
backward), whose per-layer terms are written here for a single linear layer.

- Stored bytes are summed from the real buffers of each provider (packed codes, absmax or its
  8-bit codes, nested absmax, offset, the maps) and compared with the formula.
- What a layer keeps between forward and backward is counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (any device: each saved tensor's storage, once,
  leaving out the layer's weights and adapters, which exist anyway); on CUDA the peak of the
  whole forward and backward comes from ``torch.cuda.max_memory_allocated``.

Note: one layer's memory formula
    For a linear layer ``W (N, K)`` at ``T`` tokens, rank ``r``, ``c`` bytes per element of the
    compute dtype (adapters in the compute dtype too), the tensors saved for backward are:

    - ``qlora_gpu`` (``torch``, ``triton``): the input, ``T K c`` (its autograd function
      recomputes the decoded weight and ``A x``; ``qlora_gpu.qlora``, Note: what autograd keeps);
    - a 4-bit or frozen dense base with PEFT's adapter (``bnb``, ``torchao``, ``dense-lora``):
      the input for ``dA`` and ``A x`` for ``dB``, ``T (K + r) c`` (the frozen base keeps
      nothing but its weight);
    - full fine-tuning: the input, for ``dW``, ``T K c``.

    One forward and backward adds to what exists before it (the stored weight ``S``, the
    adapters, ``x`` and the incoming gradient ``G``, ``T N c``): the saved tensors other than
    the input, the output ``y`` (``T N c``), the gradients it makes (``dx``: ``T K c``; ``dA``
    and ``dB``, or ``dW``) and one transient: for a 4-bit base a decoded weight ``N K c``
    (made in the forward and again in the backward, never kept), for a dense base one ``T K c``
    partial gradient. That is the least an implementation needs; the CUDA measurement
    (``peak - before``) shows how much more a real one allocates. Not counted: allocator
    rounding and library scratch (a cuBLAS workspace exists before the measured step, since a
    warm-up step runs first).
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.adapters import make_adapter
from benchmarks.cases import RANK, SHAPES
from qlora_gpu.state import tensor_to_numpy
from qlora_ref.memory import quantized_tensor_nbytes

__all__ = ["stored_format_rows", "torchao_nbytes", "layer_formula", "saved_tensor_bytes", "cuda_peak_bytes",
           "persistent_tensors"]

#: (provider, quant_type, double-quantization scheme) rows of the stored-bytes table.
FORMATS = (
    [("oracle", q, s) for q in ("nf4", "fp4", "int4") for s in ("none", "bnb")] + [("oracle", "nf4", "torchao")]
    + [("torch", q, s) for q in ("nf4", "fp4", "int4") for s in ("none", "bnb")]
    + [("bnb", q, s) for q in ("nf4", "fp4") for s in ("none", "bnb")] + [("torchao", "nf4", "torchao")]
)


def torchao_nbytes(numel: int, dtype_bytes: int = 2, *, blocksize: int = 64, scaler_blocksize: int = 256) -> int:
    """Stored bytes of torchao's NF4 format (``qlora_ref.torchao_nf4``).

    Notes
    -----
    ``n / 2`` packed bytes, one int8 scaler code per block (``n / B``), one factor per
    ``scaler_blocksize`` blocks and the mean in the input dtype, and the 16-entry table in the
    input dtype.

    Examples
    --------
    >>> torchao_nbytes(4096 * 4096)
    8652834
    """
    n_blocks = numel // blocksize
    return numel // 2 + n_blocks + dtype_bytes * (n_blocks // scaler_blocksize + 1 + 16)


def _nbytes(a) -> int:
    if a is None:
        return 0
    if torch.is_tensor(a):
        return a.numel() * a.element_size()
    return int(np.asarray(a).nbytes)


def _state_buffers(packed, state) -> dict:
    """Buffers of an oracle or ``qlora_gpu`` state (same field names)."""
    out = {"packed": _nbytes(packed), "code": _nbytes(state.codebook)}
    if state.nested is None:
        out["absmax"] = _nbytes(state.absmax)
    else:
        n = state.nested
        out.update({"absmax codes": _nbytes(n.codes), "nested absmax": _nbytes(n.absmax),
                    "nested map": _nbytes(n.codebook), "offset": _nbytes(n.offset)})
    return out


def _bnb_buffers(packed, qs) -> dict:
    out = {"packed": _nbytes(packed), "code": _nbytes(qs.code), "absmax" if not qs.nested else "absmax codes":
           _nbytes(qs.absmax)}
    if qs.nested:
        offset = qs.offset if torch.is_tensor(qs.offset) else np.float32(qs.offset)
        out.update({"nested absmax": _nbytes(qs.state2.absmax), "nested map": _nbytes(qs.state2.code),
                    "offset": _nbytes(offset)})
    return out


def _quantize(provider: str, W: torch.Tensor, quant_type: str, scheme: str) -> dict:
    dq = {"none": False, "bnb": True, "torchao": "torchao"}[scheme]
    if provider == "oracle":
        from qlora_ref import quantize_4bit

        return _state_buffers(*quantize_4bit(tensor_to_numpy(W), blocksize=64, quant_type=quant_type, double_quant=dq))
    if provider == "torch":
        import qlora_gpu

        return _state_buffers(*qlora_gpu.quantize_4bit(W, blocksize=64, quant_type=quant_type, double_quant=dq,
                                                       backend="torch"))
    if provider == "bnb":
        import bitsandbytes.functional as bnbf

        return _bnb_buffers(*bnbf.quantize_4bit(W, blocksize=64, compress_statistics=dq, quant_type=quant_type))
    return make_adapter("torchao").buffers(make_adapter("torchao").quantize(W))


def stored_format_rows(W: torch.Tensor, shape_key: str, *, oracle_limit: int | None = None) -> tuple[list, list]:
    """Bytes of every (provider, format, scheme) for one weight, from the buffers, and the formula.

    Parameters
    ----------
    W : Tensor, shape (N, K), bfloat16
    shape_key : str
    oracle_limit : int, optional
        Skip the oracle above this many elements (it is NumPy on one core).

    Returns
    -------
    rows : list of dict
        ``shape``, ``provider``, ``quant_type``, ``scheme``, ``nbytes`` (sum of ``buffers``),
        ``formula_nbytes``, ``bits_per_parameter``, ``buffers``.
    skipped : list of (str, str)
        ``(what, reason)`` for rows that could not be made here.
    """
    n = W.numel()
    rows, skipped = [], []
    for provider, quant_type, scheme in FORMATS:
        what = f"{provider} {quant_type} {scheme}"
        adapter = make_adapter(provider)
        ok, why = adapter.available(W.device)
        if ok and scheme == "torchao":
            ok, why = make_adapter("torchao").supports("quantize", tuple(W.shape))
        if ok and provider == "oracle" and oracle_limit is not None and n > oracle_limit:
            ok, why = False, f"the oracle is not run above {oracle_limit} elements"
        if not ok:
            skipped.append((what, why))
            continue
        buffers = _quantize(provider, W, quant_type, scheme)
        if scheme == "torchao":
            formula = torchao_nbytes(n, W.element_size())
        else:
            parts = quantized_tensor_nbytes(n, blocksize=64, double_quant=scheme == "bnb", quant_type=quant_type)
            formula = parts["codes"] + parts["constants"]
        nbytes = int(sum(buffers.values()))
        rows.append({"shape": shape_key, "provider": provider, "quant_type": quant_type, "scheme": scheme,
                     "nbytes": nbytes, "formula_nbytes": int(formula), "bits_per_parameter": 8.0 * nbytes / n,
                     "buffers": {k: int(v) for k, v in buffers.items()}})
    return rows, skipped


def layer_formula(label: str, tokens: int, shape: tuple, item: int, stored_nbytes: int | None) -> dict:
    """Bytes of one layer's forward and backward by the model of Note: one layer's memory formula.

    Returns
    -------
    dict
        ``saved`` (tensors kept for backward, the input included), ``added`` (what one forward
        and backward allocates on top of what exists before it), ``peak`` (the two together) and
        ``terms`` (every item, bytes).

    Examples
    --------
    >>> f = layer_formula("torch", 512, (4096, 4096), 2, 8_650_000)
    >>> y_and_dx, dA_and_dB, decoded_W = 512 * (4096 + 4096) * 2, 16 * (4096 + 4096) * 2, 4096 * 4096 * 2
    >>> f["saved"] == 512 * 4096 * 2, f["added"] == y_and_dx + dA_and_dB + decoded_W
    (True, True)
    """
    N, K = shape
    T, r, c = tokens, RANK, item
    dense = label.startswith("dense")
    kept_input = T * K * c  # the input: it exists before the step, so saving it allocates nothing
    saved = kept_input if label in ("torch", "triton", "dense-full") else kept_input + T * r * c
    adapters = 0 if label == "dense-full" else r * (K + N) * c
    before = {"weight": N * K * c if dense else int(stored_nbytes), "adapters": adapters, "x": T * K * c,
              "grad_y": T * N * c}
    added = {"saved beyond the input": saved - kept_input, "y": T * N * c, "grad_x": T * K * c,
             "parameter gradients": N * K * c if label == "dense-full" else adapters,
             "transient": T * K * c if dense else N * K * c}
    return {"saved": saved, "added": int(sum(added.values())), "peak": int(sum(before.values()) + sum(added.values())),
            "terms": {**before, **added}}


def persistent_tensors(obj, found=None, depth: int = 0) -> list:
    """Tensors reachable from a handle (tuples, dataclasses, objects' attributes), for exclusion."""
    found = [] if found is None else found
    if depth > 4 or obj is None:
        return found
    if torch.is_tensor(obj):
        found.append(obj)
        for name in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4"):
            if hasattr(obj, name) and torch.is_tensor(getattr(obj, name)):  # torchao's NF4Tensor
                found.append(getattr(obj, name))
        return found
    if isinstance(obj, (tuple, list)):
        for item in obj:
            persistent_tensors(item, found, depth + 1)
        return found
    if hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            persistent_tensors(value, found, depth + 1)
    return found


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError, TypeError):  # a wrapper subclass has no storage
        return id(t), 0


def saved_tensor_bytes(forward, x: torch.Tensor, persistent: list) -> dict:
    """Bytes autograd keeps for backward after one forward, leaving out ``persistent`` tensors.

    Returns
    -------
    dict
        ``bytes`` (sum over distinct storages) and ``tensors`` (``[shape, dtype, bytes]`` each).
    """
    keep = {_storage_key(t)[0] for t in persistent} | {id(t) for t in persistent}
    seen, items = set(), []

    def pack(t):
        key, nbytes = _storage_key(t)
        if key not in keep and id(t) not in keep and key not in seen:
            seen.add(key)
            items.append([list(t.shape), str(t.dtype).removeprefix("torch."), int(nbytes)])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward(x)
    del y
    return {"bytes": int(sum(i[2] for i in items)), "tensors": items}


def cuda_peak_bytes(step) -> dict:
    """Peak of ``torch.cuda.max_memory_allocated`` over one ``step()`` (a forward and backward),
    after a warm-up step: ``before`` was allocated when it started, ``added = peak - before``."""
    step()  # warm-up: kernels, autotuning, the cuBLAS workspace
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = int(torch.cuda.max_memory_allocated())
    return {"peak": peak, "before": int(before), "added": peak - int(before)}


def layer_memory(case, ws) -> dict:
    """Measured and modelled memory of one layer case (``benchmarks.cases.make_layer``)."""
    forward, params, holds, x, G = case.memory
    label, key = case.label, case.shape_key
    stored = None
    if not label.startswith("dense"):
        stored = sum(ws.adapter(label).buffers(ws.handle(label, key)).values())
    persistent = persistent_tensors(holds)
    tokens = case.params["tokens"]
    formula = layer_formula(label, tokens, SHAPES[key], case.extra["item"], stored)
    saved = saved_tensor_bytes(forward, x, persistent)
    out = {"shape": key, "provider": label, "tokens": tokens, "saved_bytes": saved["bytes"],
           "saved_tensors": saved["tensors"], "formula": formula}
    if x.device.type == "cuda":
        out["cuda"] = cuda_peak_bytes(case.fn)
    return out
