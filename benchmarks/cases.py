"""The benchmark cases: what is timed, how it is checked first, and the bytes and FLOPs it implies.

One definition serves both runners: the pytest-benchmark suite (``benchmarks/test_*.py``, CPU)
and the GPU script (``benchmarks/run_gpu.py``). A ``make_*`` function builds a ``Case`` for one
provider label (``benchmarks/adapters.py``) and one weight shape: ``case.check()`` runs the call
once and compares it with the oracle (``benchmarks/checks.py``), then ``case.fn`` is timed.

Cases (weights ``W (N, K)`` = ``(out, in)``, stored as bfloat16 before quantization, NF4, block
64, bitsandbytes' double quantization or torchao's own scheme):

- ``quantize``: ``W -> (packed, state)``;
- ``decode``: ``(packed, state) -> W`` in bfloat16, float16 and float32;
- ``matmul``: ``y = x W^T`` for ``x`` of 1, 4 and 16 rows (decode-time batches), no gradient;
- ``layer``: one QLoRA layer's forward and backward (``y = x W^T + s B A x``, gradients of
  ``x``, ``A``, ``B``) at 512 to 4096 tokens, against the same layer with a dense base in the
  compute dtype (``dense-lora``, plain LoRA) and against full fine-tuning of the layer
  (``dense-full``: ``W`` trainable, no adapter).

Note: bytes and FLOPs of a case
    Bytes are what the operation must move at least, counted from the real buffers:
    quantize reads ``W`` and writes the stored format (``S`` bytes: packed codes and every
    constant); decode reads ``S`` and writes ``N K`` elements of the output dtype; the product
    reads ``S``, ``x`` and writes ``y``. FLOPs: ``2 M N K`` for the product; for the layer
    ``4 T N K + 6 T r (K + N)`` (forward ``x W^T`` and backward ``G W``; the adapter's two
    products forward and four backward) and ``6 T N K`` for full fine-tuning (forward,
    ``G W`` and ``G^T x``). Rates: GB/s = bytes / time, TFLOP/s = FLOPs / time, and the
    percentage of the ceiling measured in the same run (``benchmarks/ceilings.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.adapters import lora_branch, make_adapter
from benchmarks.checks import OracleReference, check_derived, checked_rows
from qlora_gpu.state import tensor_to_numpy

__all__ = [
    "SHAPES", "QUICK_SHAPES", "DECODE_DTYPES", "MATMUL_ROWS", "LAYER_TOKENS", "QUICK_LAYER_TOKENS", "RANK",
    "ALPHA", "PROVIDERS", "Case", "Workspace", "make_quantize", "make_decode", "make_matmul", "make_layer",
    "compute_dtype_for",
]

#: Weight shapes ``(out, in)``: Llama-2-7B attention and MLP down projection, Llama-3-8B MLP down
#: projection (the shape of ``docs/kernels.md`` and ``cuda_check``), Llama-70B MLP down
#: projection, and one irregular shape (odd sizes, a partial last block).
SHAPES = {"4096x4096": (4096, 4096), "4096x11008": (4096, 11008), "4096x14336": (4096, 14336),
          "8192x28672": (8192, 28672), "1823x781": (1823, 781)}
#: The shapes of a quick (CPU) run.
QUICK_SHAPES = ("4096x4096", "1823x781")
DECODE_DTYPES = ("bfloat16", "float16", "float32")
MATMUL_ROWS = (1, 4, 16)
LAYER_TOKENS = (512, 1024, 2048, 4096)
QUICK_LAYER_TOKENS = (512,)
#: Tokens at which a layer's forward and backward are compared with the oracle (float64 is slow).
CHECK_TOKENS = 64
RANK, ALPHA = 16, 32
SEED = 0

#: Provider labels per case, in display order; ``dense*`` are plain-torch baselines.
PROVIDERS = {
    "quantize": ("oracle", "torch", "triton", "bnb", "torchao"),
    "decode": ("oracle", "torch", "triton", "bnb", "torchao", "torchao+compile"),
    "matmul": ("torch", "triton", "bnb", "torchao", "torchao+compile", "dense"),
    "layer": ("torch", "triton", "bnb", "torchao", "torchao+compile", "dense-lora", "dense-full"),
}


def compute_dtype_for(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA; float32 on CPU, where bfloat16 matmuls without AVX-512 BF16 run about
    200 times slower than float32 (the ``matmul_bfloat16`` ceiling of the results records it)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class Case:
    """One timed call of one provider, with its check and its formulas (Note: bytes and FLOPs)."""

    op: str
    label: str
    shape_key: str
    params: dict
    fn: object = None
    check: object = None
    bytes_moved: int | None = None
    flops: int | None = None
    skip: str | None = None
    extra: dict = field(default_factory=dict)
    memory: tuple | None = None  # layer cases: (forward, params, persistent, x, G), benchmarks/memory_model.py

    @property
    def group(self) -> str:
        """The case without the provider: providers of one group are compared side by side."""
        detail = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.op}[{self.shape_key}{',' if detail else ''}{detail}]"


class Workspace:
    """Inputs, oracle references and quantized weights of one device, made once and reused.

    Quantization is never inside a timed region except in the ``quantize`` case: the other
    cases take each provider's handle from here.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self._weights, self._refs, self._handles, self._adapters, self._checks = {}, {}, {}, {}, {}

    def adapter(self, label):
        if label not in self._adapters:
            self._adapters[label] = make_adapter(label)
        return self._adapters[label]

    def weight(self, key: str) -> torch.Tensor:
        """The bfloat16 weight of a shape on the device (seeded, ``N(0, 0.02^2)`` like an initialised layer)."""
        if key not in self._weights:
            g = torch.Generator(device="cpu").manual_seed(SEED)
            W = (torch.randn(SHAPES[key], generator=g) * 0.02).to(torch.bfloat16)
            self._weights[key] = W.to(self.device)
        return self._weights[key]

    def reference(self, key: str) -> OracleReference:
        if key not in self._refs:
            self._refs[key] = OracleReference(tensor_to_numpy(self.weight(key)))
        return self._refs[key]

    def handle(self, label: str, key: str):
        """The provider's quantized weight (uncompiled and compiled variants share it)."""
        adapter = self.adapter(label)
        name = (adapter.name, key)
        if name not in self._handles:
            self._handles[name] = adapter.quantize(adapter.prepare(self.weight(key)))
        return self._handles[name]

    def oracle_state(self, label: str, key: str):
        """The provider's quantized weight as the oracle's ``(packed, QuantState)`` (made once)."""
        name = ("oracle state", self.adapter(label).name, key)
        if name not in self._handles:
            self._handles[name] = self.adapter(label).to_oracle(self.handle(label, key))
        return self._handles[name]

    def checked(self, what: tuple, check) -> str:
        """Run ``check()`` once per ``what`` (the layer's check does not depend on the token count)."""
        if what not in self._checks:
            self._checks[what] = check()
        return self._checks[what]

    def release(self, key: str) -> None:
        """Forget everything made for one shape (the GPU script goes shape by shape)."""
        self._weights.pop(key, None)
        self._refs.pop(key, None)
        for name in [n for n in self._handles if n[-1] == key]:
            del self._handles[name]


def _args(handle) -> tuple:
    return handle if isinstance(handle, tuple) else (handle,)


def _unavailable(ws: Workspace, op: str, label: str, key: str) -> str | None:
    if label.startswith("dense"):
        return None
    adapter = ws.adapter(label)
    for ok, why in (adapter.available(ws.device), adapter.supports(op, SHAPES[key])):
        if not ok:
            return why
    return None


def _stored_nbytes(ws: Workspace, label: str, key: str) -> int:
    return sum(ws.adapter(label).buffers(ws.handle(label, key)).values())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_quantize(ws: Workspace, label: str, key: str) -> Case:
    """``quantize``: bfloat16 ``W`` to NF4 with double quantization (the provider's scheme)."""
    case = Case("quantize", label, key, {})
    case.skip = _unavailable(ws, "quantize", label, key)
    if case.skip:
        return case
    adapter = ws.adapter(label)
    W = adapter.prepare(ws.weight(key))
    case.fn = lambda: adapter.quantize(W)
    n = int(np.prod(SHAPES[key]))
    case.bytes_moved = 2 * n + _stored_nbytes(ws, label, key)  # read W (bfloat16), write the format

    def check():
        out = case.fn()
        _sync(ws.device)
        return ws.reference(key).check_quantize(*adapter.to_oracle(out))

    case.check = check
    return case


def make_decode(ws: Workspace, label: str, key: str, dtype: str) -> Case:
    """``decode``: the stored weight to ``dtype``; checked bit for bit against the oracle."""
    case = Case("decode", label, key, {"dtype": dtype})
    case.skip = _unavailable(ws, "decode", label, key)
    if case.skip:
        return case
    adapter = ws.adapter(label)
    handle = ws.handle(label, key)
    if label == "oracle":
        case.fn = lambda: adapter.decode(handle, dtype)
    else:
        decode = adapter.decode_fn(getattr(torch, dtype))
        args = _args(handle)
        case.fn = lambda: decode(*args)
    n = int(np.prod(SHAPES[key]))
    out_bytes = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    case.bytes_moved = _stored_nbytes(ws, label, key) + n * out_bytes  # read the format, write W

    def check():
        y = case.fn()
        rows = checked_rows(SHAPES[key], adapter.scheme)  # only these rows are compared (Note: checked rows)
        y = y[:rows] if isinstance(y, np.ndarray) else tensor_to_numpy(y[:rows])
        packed, state = ws.oracle_state(label, key)
        return ws.reference(key).check_decode(y, packed, state, dtype, compiled=adapter.compiled)

    case.check = check
    return case


def _inputs(shape, dtype, device, seed, requires_grad=False) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def _dense_weight(ws: Workspace, key: str, dtype) -> torch.Tensor:
    return ws.weight(key).to(dtype)


def make_matmul(ws: Workspace, label: str, key: str, rows: int) -> Case:
    """``matmul``: ``y = x W^T`` for ``rows`` tokens in the compute dtype, no gradient."""
    case = Case("matmul", label, key, {"rows": rows})
    case.skip = _unavailable(ws, "matmul", label, key)
    if case.skip:
        return case
    N, K = SHAPES[key]
    cd = compute_dtype_for(ws.device)
    item = torch.empty((), dtype=cd).element_size()
    x = _inputs((rows, K), cd, ws.device, SEED + 1)
    if label == "dense":
        W_c = _dense_weight(ws, key, cd)
        case.fn = lambda: F.linear(x, W_c)
        weight_bytes = N * K * item
    else:
        adapter = ws.adapter(label)
        product = adapter.matmul_fn()
        args = _args(ws.handle(label, key))
        case.fn = lambda: product(x, *args)
        weight_bytes = _stored_nbytes(ws, label, key)
    case.bytes_moved = weight_bytes + rows * K * item + rows * N * item  # read W and x, write y
    case.flops = 2 * rows * N * K
    case.extra.update(weight_bytes=weight_bytes, compute_dtype=str(cd).removeprefix("torch."))

    def check():
        with torch.no_grad():
            y = case.fn()
        return _check_product(ws, label, key, x, y, cd)

    case.check = check
    return case


def _weight_rows(ws: Workspace, label: str, key: str, dtype, rows: int, which: str) -> np.ndarray:
    """The provider's base weight, first ``rows`` rows, rounded where the provider rounds it, float64."""
    if label.startswith("dense"):
        return tensor_to_numpy(_dense_weight(ws, key, dtype)[:rows]).astype(np.float64)
    adapter = ws.adapter(label)
    stored = ws.weight(key).dtype
    pick = adapter.forward_weight_dtype if which == "forward" else adapter.backward_weight_dtype
    rounding = pick(dtype, stored)
    packed, state = ws.oracle_state(label, key)
    rule = "float32 intermediates" if adapter.compiled and adapter.scheme == "torchao" else "oracle"
    return ws.reference(key).weight(packed, state, str(rounding).removeprefix("torch."), rows, rule=rule)


def _np(t: torch.Tensor) -> np.ndarray:
    return tensor_to_numpy(t).astype(np.float64)


def _ml(dtype):
    import ml_dtypes

    return ml_dtypes.bfloat16 if dtype == torch.bfloat16 else np.dtype(str(dtype).removeprefix("torch."))


def _check_product(ws: Workspace, label: str, key: str, x: torch.Tensor, y: torch.Tensor, cd) -> str:
    scheme = "torchao" if label.startswith("torchao") else "bnb"
    R = checked_rows(SHAPES[key], scheme)
    W64 = _weight_rows(ws, label, key, cd, R, "forward")  # (R, K) float64
    x64 = _np(x)
    ref = x64 @ W64.T  # (rows, R)
    baseline = F.linear(x, torch.from_numpy(W64).to(device=x.device, dtype=cd))
    ratio = check_derived(y[:, :R], ref, baseline, dtype=_ml(cd), scale=float((np.abs(x64) @ np.abs(W64).T).max()),
                          what=f"y[:, :{R}]")
    where = "" if R == SHAPES[key][0] else f" on outputs 0..{R}"
    return f"derived{where}: error {ratio:.2f} of budget"


def make_layer(ws: Workspace, label: str, key: str, tokens: int) -> Case:
    """``layer``: one forward and backward of a QLoRA layer (or a dense baseline) at ``tokens`` tokens."""
    case = Case("layer", label, key, {"tokens": tokens})
    case.skip = _unavailable(ws, "layer", label, key)
    if case.skip:
        return case
    N, K = SHAPES[key]
    cd = compute_dtype_for(ws.device)
    item = torch.empty((), dtype=cd).element_size()
    scaling = ALPHA / RANK
    x = _inputs((tokens, K), cd, ws.device, SEED + 2, requires_grad=True)
    G = _inputs((tokens, N), cd, ws.device, SEED + 3)
    A = (_inputs((RANK, K), cd, ws.device, SEED + 4) / K**0.5).requires_grad_(True)
    B = (_inputs((N, RANK), cd, ws.device, SEED + 5) * 0.01).requires_grad_(True)  # nonzero: a trained adapter
    forward, params, persistent = _layer_forward(ws, label, key, cd, A, B, scaling)

    def step(x=x, G=G):
        y = forward(x)
        y.backward(G)
        for p in params:
            p.grad = None
        return y

    case.fn = step
    if label == "dense-full":
        case.flops = 6 * tokens * N * K
    else:
        case.flops = 4 * tokens * N * K + 6 * tokens * RANK * (K + N)
    case.extra.update(rank=RANK, compute_dtype=str(cd).removeprefix("torch."), item=item)
    case.check = lambda: ws.checked(("layer", label, key),
                                    lambda: _check_layer(ws, label, key, forward, params, cd, A, B, scaling))
    case.memory = (forward, params, persistent, x, G)
    return case


def _layer_forward(ws: Workspace, label: str, key: str, cd, A, B, scaling):
    """The layer's forward ``x -> y``, the tensors it makes gradients for (besides ``x``), and
    everything it holds that exists before the step (weights, adapters)."""
    if label == "dense-lora":
        W = _dense_weight(ws, key, cd)  # frozen
        return (lambda x: F.linear(x, W) + lora_branch(x, A, B, scaling)), [A, B], [W, A, B]
    if label == "dense-full":
        W = _dense_weight(ws, key, cd).clone().requires_grad_(True)
        return (lambda x: F.linear(x, W)), [W], [W]
    adapter = ws.adapter(label)
    layer = adapter.layer_fn(cd)
    handle = ws.handle(label, key)
    args = _args(handle)
    return (lambda x: layer(x, *args, A, B, scaling)), [A, B], [handle, A, B]


def _check_layer(ws: Workspace, label, key, forward, params, cd, A, B, scaling) -> str:
    """Forward and backward at ``CHECK_TOKENS`` tokens against the oracle (Note: checked rows)."""
    from qlora_ref.lora import lora_backward, lora_forward

    N, K = SHAPES[key]
    scheme = "torchao" if label.startswith("torchao") else "bnb"
    R = checked_rows(SHAPES[key], scheme)
    x = _inputs((CHECK_TOKENS, K), cd, ws.device, SEED + 6, requires_grad=True)
    G = _inputs((CHECK_TOKENS, N), cd, ws.device, SEED + 7)
    G[:, R:] = 0  # grad_x then depends on the checked rows of W only
    y = forward(x)
    y.backward(G)
    grads = {"x": x.grad}
    grads.update({"W": params[0].grad} if label == "dense-full" else {"A": A.grad, "B": B.grad})
    for p in params:
        p.grad = None
    x64, G64 = _np(x), _np(G)[:, :R]
    W_f = _weight_rows(ws, label, key, cd, R, "forward")
    W_b = _weight_rows(ws, label, key, cd, R, "backward")
    ratios = {}
    if label == "dense-full":
        ref = {"y": x64 @ W_f.T, "x": G64 @ W_b, "W": G64.T @ x64}
        base_fn = lambda W: F.linear(x, W)  # noqa: E731
        scales = {"y": np.abs(x64) @ np.abs(W_f).T, "x": np.abs(G64) @ np.abs(W_b), "W": np.abs(G64).T @ np.abs(x64)}
    else:
        A64, B64 = _np(A), _np(B)[:R]
        y_ref = lora_forward(x64, W_f, A64, B64, scaling=scaling)
        gx, gA, gB = lora_backward(G64, x64, W_b, A64, B64, scaling=scaling)
        ref = {"y": y_ref, "x": gx, "A": gA, "B": gB}
        base_fn = lambda W: F.linear(x, W) + lora_branch(x, A, B[:R], scaling)  # noqa: E731
        h = np.abs(x64) @ np.abs(A64).T  # (T, r)
        GB = np.abs(G64) @ np.abs(B64)  # (T, r)
        scales = {"y": np.abs(x64) @ np.abs(W_f).T + scaling * h @ np.abs(B64).T,
                  "x": np.abs(G64) @ np.abs(W_b) + scaling * GB @ np.abs(A64),
                  "A": scaling * GB.T @ np.abs(x64), "B": scaling * np.abs(G64).T @ h}
    # The plain torch baseline: the same layer through autograd with the same rounded weights.
    t = lambda W64: torch.from_numpy(W64).to(device=x.device, dtype=cd)  # noqa: E731
    with torch.no_grad():
        y_base = base_fn(t(W_f))
    W_bt = t(W_b).requires_grad_(label == "dense-full")
    xb = x.detach().clone().requires_grad_(True)
    if label == "dense-full":
        F.linear(xb, W_bt).backward(G[:, :R])
        base = {"x": xb.grad, "W": W_bt.grad}
    else:
        Ab, Bb = A.detach().clone().requires_grad_(True), B.detach()[:R].clone().requires_grad_(True)
        (F.linear(xb, W_bt) + lora_branch(xb, Ab, Bb, scaling)).backward(G[:, :R])
        base = {"x": xb.grad, "A": Ab.grad, "B": Bb.grad}
    base["y"] = y_base
    got = {"y": y[:, :R], **grads}
    if "B" in got:
        rest = got["B"][R:]
        assert bool((rest == 0).all()), "grad_B beyond the checked outputs must be zero (grad_y is zero there)"
        got["B"] = got["B"][:R]
    if "W" in got:
        got["W"] = got["W"][:R]
    for name in ref:
        ratios[name] = check_derived(got[name].detach(), ref[name], base[name].detach(), dtype=_ml(cd),
                                     scale=float(np.max(scales[name])), what=f"{label} {name}")
    where = "" if R == N else f" on outputs 0..{R}"
    worst = max(ratios, key=ratios.get)
    return f"derived{where} (y and grads at {CHECK_TOKENS} tokens): worst {worst} {ratios[worst]:.2f} of budget"
