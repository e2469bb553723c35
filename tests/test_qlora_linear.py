"""QLoRALinear and the QLoRA functions of qlora_gpu against the oracle's qlora_forward/backward.

Forward and the gradients of x, A and B are held to the derived tier: the error against the
oracle's float64 result is at most twice that of a plain torch baseline doing the same
computation in the same dtypes with autograd (a dense decoded weight, ``F.linear``), plus four
ulps of the terms' size. The terms' size is the same computation on absolute values (the
oracle's ``lora_forward``/``lora_backward`` fed ``|x|``, ``|W_c|``, ...), because a reduction
whose result cancels errs in proportion to its terms, not to its result. Also here: float64
``gradcheck``, what autograd saves (no dense weight), the frozen base, dropout, ``.to(dtype)``,
``merged_weight``, ``replace_linear_with_qlora`` training a small model end to end.
"""

from __future__ import annotations

import math
import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from strategies import lora_problems  # noqa: E402
from tolerances import assert_derived, assert_within, derived_budget  # noqa: E402

import qlora_gpu as G  # noqa: E402
import qlora_ref as R  # noqa: E402
from qlora_gpu import QLoRALinear, qlora_linear, replace_linear_with_qlora  # noqa: E402
from qlora_gpu.state import tensor_from_numpy, tensor_to_numpy  # noqa: E402

F = torch.nn.functional
NP = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16,
      torch.float64: np.float64}
NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (conftest sets it without CUDA)")),
]


@st.composite
def qlora_cases(draw, max_features=70):
    in_f, out_f = draw(st.integers(1, max_features)), draw(st.integers(1, max_features))
    cd = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
    return dict(
        in_f=in_f, out_f=out_f, r=draw(st.integers(1, min(in_f, out_f, 6))),
        lead=tuple(draw(st.lists(st.integers(1, 5), max_size=2))),
        cd=cd, x_dtype=draw(st.sampled_from([cd, torch.float32])),
        ad=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
        quant_type=draw(st.sampled_from(["nf4", "fp4", "int4"])), blocksize=draw(st.sampled_from([32, 64])),
        double_quant=draw(st.booleans()), bias=draw(st.booleans()),
        keep=draw(st.sampled_from([None, 0.5, 0.75])), scaling=draw(st.sampled_from([0.5, 2.0, 16 / math.sqrt(8)])),
        rng=np.random.default_rng(draw(st.integers(0, 2**32 - 1))),
    )


def make_problem(c, device="cpu"):
    """Arrays for the oracle (NumPy, in their dtypes) and the same values as tensors."""
    rng, lead = c["rng"], c["lead"]
    W = rng.standard_normal((c["out_f"], c["in_f"])).astype(np.float32)
    packed, state = R.quantize_4bit(W, blocksize=c["blocksize"], quant_type=c["quant_type"],
                                    double_quant=c["double_quant"])
    a = dict(
        x=rng.standard_normal((*lead, c["in_f"])).astype(NP[c["x_dtype"]]),
        A=(rng.standard_normal((c["r"], c["in_f"])) / math.sqrt(c["in_f"])).astype(NP[c["ad"]]),
        B=rng.standard_normal((c["out_f"], c["r"])).astype(NP[c["ad"]]),
        bias=rng.standard_normal(c["out_f"]).astype(NP[c["x_dtype"]]) if c["bias"] else None,
        mask=((rng.random((*lead, c["in_f"])) < c["keep"]) / c["keep"]).astype(np.float32) if c["keep"] else None,
        G=rng.standard_normal((*lead, c["out_f"])).astype(NP[c["x_dtype"]]),
    )
    t = {k: None if v is None else tensor_from_numpy(v, device) for k, v in a.items()}
    return packed, state, a, t


def baseline(t, W_c, scaling, cd):
    """Plain torch with autograd, same dtypes: the derived tier's yardstick."""
    x = t["x"].clone().requires_grad_(True)
    A, B = t["A"].clone().requires_grad_(True), t["B"].clone().requires_grad_(True)
    y_base = F.linear(x.to(cd), W_c, None if t["bias"] is None else t["bias"].to(cd))
    x_tilde = x.to(A.dtype) if t["mask"] is None else x.to(A.dtype) * t["mask"].to(A.dtype)
    y_lora = F.linear(F.linear(x_tilde, A), B) * scaling
    y = (y_base.to(torch.promote_types(cd, A.dtype)) + y_lora).to(x.dtype)
    y.backward(t["G"])
    return y.detach(), x.grad, A.grad, B.grad


def check_against_oracle(c, backend, device="cpu"):
    packed_np, state_np, a, t = make_problem(c, device)
    cd, s = c["cd"], c["scaling"]
    state = G.QuantState.from_oracle(state_np, device)
    packed = tensor_from_numpy(packed_np, device)
    x = t["x"].clone().requires_grad_(True)
    A, B = t["A"].clone().requires_grad_(True), t["B"].clone().requires_grad_(True)
    y = qlora_linear(x, packed, state, A, B, scaling=s, compute_dtype=cd, bias=t["bias"], dropout_mask=t["mask"],
                     backend=backend)
    y.backward(t["G"])
    assert y.dtype == x.dtype and A.grad.dtype == A.dtype and x.grad.dtype == x.dtype
    # The functional pair (no autograd) computes the very same values.
    common = dict(scaling=s, compute_dtype=cd, dropout_mask=t["mask"], backend=backend)
    assert torch.equal(G.qlora_forward(t["x"], packed, state, t["A"], t["B"], bias=t["bias"], **common), y)
    for got, want in zip(G.qlora_backward(t["G"], t["x"], packed, state, t["A"], t["B"], **common),
                         (x.grad, A.grad, B.grad)):
        assert torch.equal(got, want)

    oracle = dict(scaling=s, compute_dtype=NAMES[cd], dropout_mask=a["mask"])
    y64 = R.qlora_forward(a["x"], packed_np, state_np, a["A"], a["B"], bias=a["bias"], **oracle)
    grads64 = R.qlora_backward(a["G"], a["x"], packed_np, state_np, a["A"], a["B"], **oracle)
    W_c64 = R.qlora_base_weight(packed_np, state_np, compute_dtype=NAMES[cd])
    mag = {k: None if v is None else np.abs(v.astype(np.float64)) for k, v in a.items()}
    terms_y = R.lora_forward(mag["x"], np.abs(W_c64), mag["A"], mag["B"], scaling=s, bias=mag["bias"],
                             dropout_mask=mag["mask"])
    terms_g = R.lora_backward(mag["G"], mag["x"], np.abs(W_c64), mag["A"], mag["B"], scaling=s,
                              dropout_mask=mag["mask"])
    base = baseline(t, tensor_from_numpy(W_c64.astype(NP[cd]), device), s, cd)
    out_np = NP[c["x_dtype"]]
    # The fused Triton product of ONE row multiplies the float32 decoded weight W32, not W_c
    # (qlora_gpu.kernels.matmul, Note: the one-row product's weights): its base term may differ
    # from the oracle's by exactly |x_c| |W32 - W_c|^T, which the budget of y adds.
    K = W_c64.shape[1]
    one_row = backend == "triton" and int(np.prod(a["x"].shape[:-1])) == 1 and K % 2 == 0
    rounding = 0.0
    if one_row:
        W32 = R.dequantize_4bit(packed_np, state_np, dtype=np.float32).reshape(W_c64.shape).astype(np.float64)
        x_c = np.abs(a["x"].astype(NP[cd]).astype(np.float64)).reshape(1, K)
        rounding = float(np.max(x_c @ np.abs(W32 - W_c64).T, initial=0.0))
    for name, got, ref, b, terms, dt, extra in [
        ("y", y, y64, base[0], terms_y, out_np, rounding),
        ("grad_x", x.grad, grads64[0], base[1], terms_g[0], out_np, 0.0),
        ("grad_A", A.grad, grads64[1], base[2], terms_g[1], NP[c["ad"]], 0.0),
        ("grad_B", B.grad, grads64[2], base[3], terms_g[2], NP[c["ad"]], 0.0),
    ]:
        scale = float(np.max(terms, initial=0.0))
        assert_within(got, ref, derived_budget(ref, b, dtype=dt, scale=scale) + extra, f"{name} ({backend})")


@pytest.mark.parametrize("backend", BACKENDS)
@given(c=qlora_cases())
def test_qlora_linear_matches_oracle_forward_and_gradients(backend, c):
    if backend == "triton":  # the interpreter is slow: smaller layers
        c = dict(c, in_f=min(c["in_f"], 40), out_f=min(c["out_f"], 40), r=min(c["r"], c["in_f"], c["out_f"], 40))
    check_against_oracle(c, backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@settings(max_examples=20)
@given(c=qlora_cases(max_features=300))
def test_qlora_linear_matches_oracle_on_cuda(c):
    check_against_oracle(c, "triton", device="cuda")


@given(p=lora_problems(max_features=12, max_rank=4))
def test_dense_lora_functions_match_the_oracle(p):
    """qlora_gpu.lora_forward/backward on a dense W, all in float64 (inputs converted exactly):
    the oracle's values up to float64 summation order, 8 ulps of the terms."""
    t = {k: None if v is None else tensor_from_numpy(v).double() for k, v in p.items() if k != "scaling"}
    s = p["scaling"]
    y = G.lora_forward(t["x"], t["W"], t["A"], t["B"], scaling=s, bias=t["bias"], dropout_mask=t["mask"])
    grads = G.lora_backward(t["grad_y"], t["x"], t["W"], t["A"], t["B"], scaling=s, dropout_mask=t["mask"])
    mag = {k: None if v is None else np.abs(v.astype(np.float64)) for k, v in p.items() if k != "scaling"}
    terms_y = R.lora_forward(mag["x"], mag["W"], mag["A"], mag["B"], scaling=s, bias=mag["bias"],
                             dropout_mask=mag["mask"])
    terms_g = R.lora_backward(mag["grad_y"], mag["x"], mag["W"], mag["A"], mag["B"], scaling=s,
                              dropout_mask=mag["mask"])
    ref_y = R.lora_forward(p["x"], p["W"], p["A"], p["B"], scaling=s, bias=p["bias"], dropout_mask=p["mask"])
    ref_g = R.lora_backward(p["grad_y"], p["x"], p["W"], p["A"], p["B"], scaling=s, dropout_mask=p["mask"])
    eps = np.finfo(np.float64).eps
    for name, got, ref, terms in zip(["y", "grad_x", "grad_A", "grad_B"], (y, *grads), (ref_y, *ref_g),
                                     (terms_y, *terms_g)):
        assert_within(got, ref, 8 * eps * float(np.max(terms, initial=0.0)), name)


def test_gradcheck_float64():
    """float64 everywhere (the base decoded exactly to float64): autograd's numerical check."""
    torch.manual_seed(0)
    W = torch.randn(7, 9)
    packed, state = G.quantize_4bit(W, blocksize=32, quant_type="nf4", double_quant=True)
    x = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    B = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64)
    mask = (torch.rand(2, 3, 9) < 0.5).double() * 2

    def f(x, A, B):
        return qlora_linear(x, packed, state, A, B, scaling=1.5, compute_dtype=torch.float64, bias=bias,
                            dropout_mask=mask, backend="torch")

    assert torch.autograd.gradcheck(f, (x, A, B))


def test_autograd_saves_no_dense_weight():
    """Note: what autograd keeps (qlora_gpu.qlora): the input, the mask, A, B and the packed bytes."""
    torch.manual_seed(0)
    layer = QLoRALinear(256, 384, r=8, dropout=0.1, compute_dtype=torch.bfloat16).train()
    x = torch.randn(4, 256, dtype=torch.bfloat16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    dense = 384 * 256
    assert saved, "the custom function saved nothing: the hook did not run"
    for t in saved:
        assert not (t.is_floating_point() and t.numel() >= dense), f"a dense {tuple(t.shape)} {t.dtype} tensor is saved"
    persistent = {layer.weight.data_ptr(), layer.lora_A.weight.data_ptr(), layer.lora_B.weight.data_ptr()}
    activation_bytes = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in persistent)
    x_bytes = x.numel() * x.element_size()
    assert activation_bytes <= 2 * x_bytes  # the input and a mask of its size, nothing else
    y.float().sum().backward()
    assert x.grad is not None and layer.lora_A.weight.grad is not None


def test_base_gets_no_gradient():
    torch.manual_seed(0)
    layer = QLoRALinear(32, 16, r=4, compute_dtype=torch.float32)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 32, requires_grad=True)
    layer(x).sum().backward()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    assert layer.bias.grad is None and not layer.weight.requires_grad and layer.weight.grad is None
    assert layer.lora_A.weight.grad.abs().sum() > 0 and layer.lora_B.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_from_linear_quantizes_like_the_oracle_and_starts_as_the_base(quant_type):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 20)
    layer = QLoRALinear.from_linear(linear, r=4, alpha=8, quant_type=quant_type, compute_dtype=torch.float32)
    packed_ref, state_ref = R.quantize_4bit(linear.weight.detach().numpy(), blocksize=64, quant_type=quant_type,
                                            double_quant=True)
    assert bytes(tensor_to_numpy(layer.weight)) == bytes(packed_ref)
    assert layer.bias.data_ptr() != linear.bias.data_ptr() and torch.equal(layer.bias, linear.bias)
    x = torch.randn(5, 48)
    W_dec = tensor_from_numpy(R.dequantize_4bit(packed_ref, state_ref, dtype="float32"))
    assert torch.allclose(layer(x), F.linear(x, W_dec, linear.bias), rtol=1e-6, atol=1e-6)  # B = 0


def test_merged_weight_matches_oracle_merge():
    torch.manual_seed(0)
    layer = QLoRALinear(40, 24, r=3, alpha=6, rslora=True)
    torch.nn.init.normal_(layer.lora_B.weight)
    W = R.dequantize_4bit(tensor_to_numpy(layer.weight), layer.quant_state.to_oracle(), dtype="float32")
    A, B = tensor_to_numpy(layer.lora_A.weight.detach()), tensor_to_numpy(layer.lora_B.weight.detach())
    assert layer.scaling == R.lora_scaling(6, 3, rslora=True)
    ref = R.lora_merge(W, A, B, layer.scaling)
    plain32 = W + np.float32(layer.scaling) * (B @ A)  # the same sum in float32, NumPy
    assert_derived(layer.merged_weight(), ref, plain32, dtype=np.float32, what="merged weight",
                   scale=float(np.max(np.abs(W) + layer.scaling * (np.abs(B) @ np.abs(A)))))


def test_dropout_uses_one_mask_of_zeros_and_scaled_ones():
    torch.manual_seed(0)
    layer = QLoRALinear(16, 8, r=2, dropout=0.5, compute_dtype=torch.float32)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 16)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    mask = torch.empty_like(x).bernoulli_(0.5).div_(0.5)
    y_ref = qlora_linear(x, layer.weight, layer.quant_state, layer.lora_A.weight, layer.lora_B.weight,
                         scaling=layer.scaling, compute_dtype=torch.float32, bias=layer.bias, dropout_mask=mask)
    assert torch.equal(y, y_ref)
    layer.eval()
    assert torch.equal(layer(x), layer(x)) and not torch.equal(layer(x), y)


def test_to_dtype_moves_the_4bit_state_without_converting_it():
    layer = QLoRALinear(64, 32, r=2, double_quant=False)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to(torch.bfloat16)
    assert layer.lora_A.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    after = layer.state_dict()
    for k in ("weight", "weight.absmax", "weight.quant_map"):
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_layer_refuses_bad_options():
    with pytest.raises(ValueError, match="rank"):
        QLoRALinear(4, 4, r=5)
    with pytest.raises(ValueError, match="r must be a positive int"):
        QLoRALinear(4, 4, r=0)
    with pytest.raises(ValueError, match="dropout"):
        QLoRALinear(4, 4, r=1, dropout=1.0)
    with pytest.raises(ValueError, match="alpha"):
        QLoRALinear(4, 4, r=1, alpha=-1)
    with pytest.raises(TypeError, match="nn.Linear"):
        QLoRALinear.from_linear(torch.nn.Conv1d(2, 2, 1))
    layer = QLoRALinear(8, 4, r=1)
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="dropout_mask"):
        qlora_linear(torch.randn(2, 8), layer.weight, layer.quant_state, layer.lora_A.weight, layer.lora_B.weight,
                     scaling=1.0, dropout_mask=torch.ones(3, 8))


# --------------------------------------------------------------------- whole models


class TinyBlock(torch.nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.embed = torch.nn.Embedding(16, d)
        self.attn = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(d, d), "v_proj": torch.nn.Linear(d, d)})
        self.mlp = torch.nn.ModuleDict({"up_proj": torch.nn.Linear(d, 2 * d), "down_proj": torch.nn.Linear(2 * d, d)})
        self.head = torch.nn.Linear(d, 16)

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.attn["v_proj"](h) * torch.sigmoid(self.attn["q_proj"](h))
        h = h + self.mlp["down_proj"](torch.relu(self.mlp["up_proj"](h)))
        return self.head(h)


def test_replace_linear_matches_names_like_peft():
    model = TinyBlock()
    names = replace_linear_with_qlora(model, ["q_proj", "v_proj"], r=2)
    assert names == ["attn.q_proj", "attn.v_proj"] and isinstance(model.attn["q_proj"], QLoRALinear)
    assert type(model.mlp["up_proj"]) is torch.nn.Linear and not model.head.weight.requires_grad
    model = TinyBlock()
    assert replace_linear_with_qlora(model, r".*_proj", r=2) == ["attn.q_proj", "attn.v_proj", "mlp.up_proj",
                                                                 "mlp.down_proj"]
    with pytest.raises(ValueError, match="no nn.Linear"):
        replace_linear_with_qlora(TinyBlock(), ["o_proj"])
    with pytest.raises(TypeError, match="target_modules"):
        replace_linear_with_qlora(TinyBlock(), 3)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False), ("int4", True)])
def test_small_model_fine_tunes_end_to_end(quant_type, double_quant):
    """A few Adam steps on a fixed batch: the loss falls, only adapters change."""
    torch.manual_seed(0)
    model = TinyBlock()
    replace_linear_with_qlora(model, ["q_proj", "v_proj", "up_proj", "down_proj"], r=4, alpha=8,
                              quant_type=quant_type, double_quant=double_quant, compute_dtype=torch.float32)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainable, total = G.trainable_parameters(model)
    assert 0 < trainable < total
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 16, (8, 12))
    target = torch.roll(tokens, 1, dims=1)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(tokens).reshape(-1, 16), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), f"{k} changed during training"
    assert sorted(G.adapter_state_dict(model))[:2] == ["attn.q_proj.lora_A.weight", "attn.q_proj.lora_B.weight"]
