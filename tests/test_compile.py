"""``torch.compile`` of a model made of QLoRALinear layers, on CPU with the torch backend.

``fullgraph=True``: dynamo must trace the layers, the decode of the 4-bit weight and the custom
autograd function without a graph break, and inductor must generate the code. The compiled
forward and gradients are held to the derived tier against the same model run eagerly in
float64, with the eager float32 model as the baseline (inductor fuses and reorders).
"""

from __future__ import annotations

import copy
import shutil

import pytest

torch = pytest.importorskip("torch")

from tolerances import assert_derived  # noqa: E402

from qlora_gpu import QLoRALinear  # noqa: E402
from qlora_gpu.state import tensor_to_numpy  # noqa: E402

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="torch.compile's inductor backend on CPU needs a C++ compiler")


def make_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        QLoRALinear(64, 96, r=4, compute_dtype=torch.float32, backend="torch"),
        torch.nn.GELU(),
        QLoRALinear(96, 32, r=4, quant_type="fp4", double_quant=False, compute_dtype=torch.float32, backend="torch"),
    )
    for layer in (model[0], model[2]):
        torch.nn.init.normal_(layer.lora_B.weight)  # so that the adapters contribute
    return model


def as_float64(model):
    """The same model in float64: adapters and biases converted exactly, 4-bit state untouched."""
    model = copy.deepcopy(model).to(torch.float64)
    for layer in (model[0], model[2]):
        layer.compute_dtype = torch.float64
    return model


def run(model, x, call=None):
    """Forward and backward; ``call`` (a compiled model) runs instead of ``model`` if given."""
    x = x.clone().requires_grad_(True)
    y = (call or model)(x)
    y.sum().backward()
    return [y.detach(), x.grad, model[0].lora_A.weight.grad, model[2].lora_B.weight.grad]


@needs_compiler
def test_compiled_model_matches_eager_in_the_derived_tier():
    x = torch.randn(5, 64)
    model = make_model()
    eager32 = run(model, x)
    ref64 = run(as_float64(model), x.double())
    model.zero_grad()
    torch._dynamo.reset()
    got = run(model, x, call=torch.compile(model, fullgraph=True))
    for name, g, r, b in zip(["y", "grad_x", "grad_A", "grad_B"], got, ref64, eager32):
        assert_derived(g, tensor_to_numpy(r), b, dtype="float32", what=f"compiled {name}")
