"""PEFT conformance: PEFT's LoRA, rsLoRA and DoRA layers against the oracle fed the same weights.

Bases: ``torch.nn.Linear`` in float32, and bitsandbytes' ``Linear4bit`` (NF4, double
quantization, block 64, bfloat16 compute, CPU), whose weight the oracle decodes from
bitsandbytes' own quant state. ``alpha != r`` (r = 4, alpha = 12: scaling 3, rsLoRA 6). Each case
runs once with PEFT's dropout off and once with a fixed dropout mask put in place of PEFT's
dropout module (keep probability 1/2, so the mask's products are exact), which also exercises
DoRA's dropout path (PEFT recomputes the base term on the dropped input).

Note: conformance tolerances
    The derived tier (``tests/tolerances.py``): PEFT's error against the oracle's float64 result
    is at most twice the error of a plain torch computation of the same quantity in the same
    dtype, plus a few units of that dtype's epsilon times the result's largest magnitude. The
    baseline is the dense form ``x (c * (W + s B A))^T + bias`` (``c = 1`` for LoRA; for DoRA
    ``c = m / ||W + s B A||`` with the norm detached; with a mask, the unmerged form with the
    mask on the adapter's input), differentiated by torch autograd: the same mathematics with a
    different order of operations. The same code run in float64 must first agree with the oracle
    to float64 rounding, so that the baseline cannot hide an oracle mistake by widening the
    budget. Its dtype is the dtype PEFT computes the quantity in:

    - ``nn.Linear``: float32 throughout (4 ulps).
    - ``Linear4bit``: the output and ``grad_x`` in bfloat16 (the base matmul, its input gradient
      and the output are bf16; 1 ulp covers the output's final rounding, half an ulp, twice);
      ``grad_A`` and ``grad_B`` in float32, since PEFT keeps the adapters in float32 and casts
      ``x`` to them (4 ulps); DoRA's ``grad_m`` in bfloat16, since it multiplies the base
      layer's bf16 output.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
import ml_dtypes  # noqa: E402
from bnb_cpu import bnb_decoded  # noqa: E402
from bnb_cpu import decode_model as bnb_decode_model  # noqa: E402
from tolerances import assert_bit_equal, assert_derived, assert_within  # noqa: E402

from qlora_gpu.state import tensor_to_numpy  # noqa: E402
from qlora_ref import (  # noqa: E402
    NestedAbsmax,
    QuantState,
    dora_backward,
    dora_forward,
    dora_weight_norm,
    lora_backward,
    lora_forward,
    lora_scaling,
    qlora_base_weight,
)
from qlora_ref.blockwise import unpack_4bit  # noqa: E402
from qlora_ref.double_quant import dequantize_absmax  # noqa: E402

R, ALPHA = 4, 12
IN_FEATURES, OUT_FEATURES = 80, 48  # 3840 weights: 60 blocks of 64
LEAD = (3, 5)  # leading dimensions of x: batch, sequence
KEEP = 0.5  # dropout keep probability of the masked cases: mask entries 0 or 2, exact products
VARIANTS = {
    "lora": dict(use_rslora=False, use_dora=False),
    "rslora": dict(use_rslora=True, use_dora=False),
    "dora": dict(use_rslora=False, use_dora=True),
}
ADAPTER = "default"


class _Net(torch.nn.Module):
    """The smallest model PEFT can wrap: one linear layer named ``proj``."""

    def __init__(self, layer, loaded_in_4bit: bool):
        super().__init__()
        self.proj = layer
        self.is_loaded_in_4bit = loaded_in_4bit  # what transformers sets; PEFT dispatches on it

    def forward(self, x):
        return self.proj(x)


class _FixedMask(torch.nn.Module):
    """Stands in for PEFT's ``nn.Dropout``: multiplies by a known mask (already divided by keep)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask.to(x.dtype)


def _np64(t) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()  # exact from float32 and bfloat16


def _linear_base(generator):
    base = torch.nn.Linear(IN_FEATURES, OUT_FEATURES, bias=True)
    with torch.no_grad():
        base.weight.copy_(torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator))
        base.bias.copy_(torch.randn(OUT_FEATURES, generator=generator))
    return base


def _linear4bit_base(generator):
    bnb = pytest.importorskip("bitsandbytes")
    W = torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator).to(torch.bfloat16)
    base = bnb.nn.Linear4bit(IN_FEATURES, OUT_FEATURES, bias=True, compute_dtype=torch.bfloat16,
                             compress_statistics=True, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                    blocksize=64)
    base.bias = torch.nn.Parameter(torch.randn(OUT_FEATURES, generator=generator).to(torch.bfloat16),
                                   requires_grad=False)
    return base.to("cpu")  # quantizes on CPU


def _oracle_state(base):
    """(packed, QuantState) from bitsandbytes' own quant state, checked by decoding both ways."""
    import bitsandbytes as bnb

    qs = base.weight.quant_state
    packed = base.weight.data.numpy().copy()  # ((n + 1) // 2, 1) uint8
    assert qs.nested and qs.state2.blocksize == 256, "the test builds an NF4 layer with double quantization"
    nested = NestedAbsmax(scheme="bnb", codes=qs.absmax.numpy().copy(), absmax=qs.state2.absmax.numpy().copy(),
                          codebook=qs.state2.code.numpy().copy(), offset=np.float32(qs.offset.item()),
                          blocksize=qs.state2.blocksize)
    state = QuantState(shape=tuple(qs.shape), dtype="bfloat16", blocksize=qs.blocksize, quant_type=qs.quant_type,
                       codebook=qs.code.numpy().copy(), nested=nested)
    # Exact tier: the oracle's decode of bitsandbytes' state, by the path this machine's
    # bitsandbytes takes (tests/bnb_cpu.py), equals bitsandbytes' own decode.
    theirs = tensor_to_numpy(bnb.functional.dequantize_4bit(base.weight.data, qs))
    assert_bit_equal(_as_bnb_decodes(packed, state), theirs, "decoded NF4 base weight")
    try:
        from qlora_ref.formats.bnb import from_bnb_state_dict
    except ImportError:  # the state-dict reader is optional here; the direct state is checked above
        return packed, state
    entries = {k: v.numpy() for k, v in base.state_dict().items() if k.startswith("weight")}
    packed_sd, state_sd = from_bnb_state_dict(entries)
    assert_bit_equal(_as_bnb_decodes(packed_sd, state_sd), theirs,
                     "decoded NF4 base weight read through from_bnb_state_dict")
    return packed, state


def _as_bnb_decodes(packed, state):
    """The bf16 weight as this machine's bitsandbytes decodes it (the oracle's run of its model)."""
    codes = unpack_4bit(packed, state.numel)
    absmax = dequantize_absmax(state.nested) if state.absmax is None else state.absmax
    return bnb_decoded(codes, absmax, state.shape, state.blocksize, state.quant_type, "bfloat16")


def _peft_layer(base, variant, loaded_in_4bit, generator):
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0, **VARIANTS[variant])
    model = peft.get_peft_model(_Net(base, loaded_in_4bit), config)
    layer = model.base_model.model.proj
    expected = peft.tuners.lora.bnb.Linear4bit if loaded_in_4bit else peft.tuners.lora.Linear
    assert type(layer) is expected, f"PEFT dispatched {type(layer).__name__}"
    return model, layer


def _torch_baseline(x, W, A, B, m, bias, s, G, dtype):
    """The dense merged form in ``dtype``, through torch autograd: y, grad_x, grad_A, grad_B, grad_m."""
    leaves = [torch.tensor(a, dtype=dtype, requires_grad=True) if a is not None else None for a in (x, A, B, m)]
    x_, A_, B_, m_ = leaves
    W_, b_, G_ = (torch.tensor(a, dtype=dtype) for a in (W, bias, G))
    V = W_ + s * (B_ @ A_)  # (out, in)
    if m_ is not None:
        V = (m_ / torch.linalg.norm(V, dim=1).detach())[:, None] * V  # PEFT's detached norm
    y = torch.nn.functional.linear(x_, V, b_)
    y.backward(G_)
    return [y] + [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("masked", [False, True], ids=["no-dropout", "mask"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("base_kind", ["linear", "linear4bit"])
def test_peft_layer_matches_the_oracle(base_kind, variant, masked):
    generator = torch.Generator().manual_seed(0)
    four_bit = base_kind == "linear4bit"
    base = _linear4bit_base(generator) if four_bit else _linear_base(generator)
    if four_bit:
        packed, state = _oracle_state(base)  # before any forward (docs/spec.md, section 5.3: CPU repacking hazard)
        W = qlora_base_weight(packed, state, compute_dtype="bfloat16")  # (out, in) float64
        # PEFT's forward decodes the base through bitsandbytes: on a CPU whose decode follows
        # another model (the AVX-512 row-crossing absmax: 48 x 80 has blocks crossing rows)
        # the LoRA math is checked on the weight it really used.
        if bnb_decode_model() != "oracle":
            W = _as_bnb_decodes(packed, state).astype(np.float64)
    else:
        W = _np64(base.weight)
    bias = _np64(base.bias)
    model, layer = _peft_layer(base, variant, four_bit, generator)
    s = layer.scaling[ADAPTER]
    assert s == lora_scaling(ALPHA, R, rslora=VARIANTS[variant]["use_rslora"])

    lora_A, lora_B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    # PEFT's initialisation: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform_, a = sqrt(5)), B = 0.
    # On the bf16 4-bit base PEFT creates the adapters in bf16 and casts them to float32 only
    # afterwards (autocast_adapter_dtype): A holds bf16 values, and the bound is rounded too.
    bound = 1 / math.sqrt(IN_FEATURES)
    A0 = lora_A.detach()
    if four_bit:
        assert torch.equal(A0, A0.to(torch.bfloat16).to(torch.float32)), "A is not made of bf16 values"
        bound = float(torch.tensor(bound).to(torch.bfloat16))  # round to nearest is monotonic
    assert 0.9 * bound < float(A0.abs().max()) <= bound and not lora_B.any()
    dora = VARIANTS[variant]["use_dora"]
    compute = torch.bfloat16 if four_bit else torch.float32
    if dora:
        # m starts at ||W + s B A|| = ||W||, row by row. On the bf16 4-bit base PEFT computes it
        # while the adapters are still bf16, so in bf16: the baseline is a bf16 norm too.
        m0 = layer.lora_magnitude_vector[ADAPTER].weight
        W_ = torch.tensor(W, dtype=compute)
        assert_derived(m0, dora_weight_norm(W, _np64(lora_A), _np64(lora_B), scaling=s),
                       torch.sqrt(torch.sum(W_ * W_, dim=1)), dtype=_np_dtype(compute), ulps=1.0,
                       what="DoRA's initial magnitude")
    # "Train" the adapter: a non-zero B, and a magnitude away from the norm.
    with torch.no_grad():
        lora_B.copy_(0.5 * torch.randn(lora_B.shape, generator=generator))
        if dora:
            m0.mul_(torch.empty(OUT_FEATURES).uniform_(0.8, 1.2, generator=generator))
    mask = None
    if masked:
        mask = (torch.rand(*LEAD, IN_FEATURES, generator=generator) < KEEP).to(torch.float32) / KEEP
        layer.lora_dropout[ADAPTER] = _FixedMask(mask)
    model.train()  # and x.requires_grad: bitsandbytes does not repack the weight for CPU inference

    x = torch.randn(*LEAD, IN_FEATURES, generator=generator).to(compute).requires_grad_(True)
    y = model(x)
    G = torch.randn(y.shape, generator=generator).to(y.dtype)
    y.backward(G)
    theirs = {"y": y, "grad_x": x.grad, "grad_A": lora_A.grad, "grad_B": lora_B.grad}

    x64, G64, A64, B64 = _np64(x), _np64(G), _np64(lora_A), _np64(lora_B)
    d = None if mask is None else _np64(mask)
    if dora:
        m = layer.lora_magnitude_vector[ADAPTER].weight
        theirs["grad_m"] = m.grad
        m64 = _np64(m)
        ours = {"y": dora_forward(x64, W, A64, B64, m64, scaling=s, bias=bias, dropout_mask=d)}
        grads = dora_backward(G64, x64, W, A64, B64, m64, scaling=s, dropout_mask=d)
        ours.update(zip(["grad_x", "grad_A", "grad_B", "grad_m"], grads))
    else:
        m64 = None
        ours = {"y": lora_forward(x64, W, A64, B64, scaling=s, bias=bias, dropout_mask=d)}
        ours.update(zip(["grad_x", "grad_A", "grad_B"], lora_backward(G64, x64, W, A64, B64, scaling=s,
                                                                       dropout_mask=d)))

    # Baselines in the dtype PEFT computes each quantity in (Note: conformance tolerances).
    dtypes = {"y": compute, "grad_x": compute, "grad_A": torch.float32, "grad_B": torch.float32, "grad_m": compute}
    for name, actual in theirs.items():
        # The baseline's code run in float64 must agree with the oracle to float64 rounding first;
        # otherwise a mistake in the oracle would only show up as a wider budget below. Both sum the same
        # terms in another order: about K u |terms|, 1e-13 relative here; 2^-30 of the largest
        # value leaves room for cancellation, and any wrong term (1e-3 relative or more) fails.
        baseline64 = _baseline(name, torch.float64, x64, W, A64, B64, m64, bias, s, G64, d)
        assert_within(baseline64, ours[name], 2.0**-30 * float(np.abs(ours[name]).max()),
                      what=f"torch float64 baseline vs oracle, {name}")
        baseline = _baseline(name, dtypes[name], x64, W, A64, B64, m64, bias, s, G64, d)
        ulps = 1.0 if dtypes[name] == torch.bfloat16 else 4.0
        assert_derived(actual, ours[name], baseline, dtype=_np_dtype(dtypes[name]), ulps=ulps,
                       what=f"{base_kind} {variant}{' masked' if masked else ''}: {name}")


def _np_dtype(dtype):
    return ml_dtypes.bfloat16 if dtype == torch.bfloat16 else np.float32


def _baseline(name, dtype, x, W, A, B, m, bias, s, G, d):
    """A plain torch computation of quantity ``name`` in ``dtype``."""
    if d is None:
        results = _torch_baseline(x, W, A, B, m, bias, s, G, dtype)
        return dict(zip(["y", "grad_x", "grad_A", "grad_B", "grad_m"], results))[name]
    return _masked_baseline(x, W, A, B, m, bias, s, G, d, dtype)[name]


def _masked_baseline(x, W, A, B, m, bias, s, G, d, dtype):
    """With a mask the layer is not a dense product: y = x W^T + b + (c - 1) (d x) W^T + c s (d x) A^T B^T,
    differentiated by torch autograd in ``dtype`` (c = 1 for LoRA, the norm detached for DoRA)."""
    x_, A_, B_ = (torch.tensor(a, dtype=dtype, requires_grad=True) for a in (x, A, B))
    W_, b_, G_, d_ = (torch.tensor(a, dtype=dtype) for a in (W, bias, G, d))
    xd = d_ * x_
    lora = s * ((xd @ A_.T) @ B_.T)
    if m is None:
        m_ = None
        y = x_ @ W_.T + b_ + lora
    else:
        m_ = torch.tensor(m, dtype=dtype, requires_grad=True)
        c = m_ / torch.linalg.norm(W_ + s * (B_ @ A_), dim=1).detach()
        y = x_ @ W_.T + b_ + (c - 1) * (xd @ W_.T) + c * lora
    y.backward(G_)
    return {"y": y, "grad_x": x_.grad, "grad_A": A_.grad, "grad_B": B_.grad, "grad_m": None if m_ is None else m_.grad}
