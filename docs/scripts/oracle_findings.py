"""Minimal reproductions of what the oracle found in bitsandbytes and torchao (docs/findings.md).

Each function runs one reproduction on this machine and returns what it saw; ``tests/test_findings.py``
runs them all and asserts the defect where this machine's bitsandbytes takes the path that has it,
and the oracle's result everywhere. Run ``python docs/scripts/oracle_findings.py`` to print them.
"""

from __future__ import annotations

import numpy as np


def _bnb_decode(packed, state, dtype):
    from qlora_ref.conformance.providers.comparators import BitsAndBytesProvider

    return BitsAndBytesProvider(device="cpu").dequantize(packed, state, dtype=dtype)


# --8<-- [start:row_crossing]
def row_crossing_absmax():
    """A (64, 96) weight in blocks of 64: the second row starts inside block 1."""
    from qlora_ref import dequantize_4bit, quantize_4bit
    from qlora_ref.blockwise import unpack_4bit

    W = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    packed, state = quantize_4bit(W, blocksize=64)
    theirs = _bnb_decode(packed, state, "float32")
    ours = dequantize_4bit(packed, state, dtype="float32")
    # bitsandbytes' AVX-512 loop: element (row, col) scaled by absmax[row * (96 // 64) + col // 64]
    # instead of absmax[(row * 96 + col) // 64], the block it is in.
    rows, cols = np.indices(W.shape)
    values = state.codebook[unpack_4bit(packed, W.size)].reshape(W.shape)
    wrong_index = (values * state.absmax[rows * (96 // 64) + cols // 64]).astype(np.float32)
    return {"differ": int(np.sum(theirs != ours)), "of": W.size,
            "equal to the wrong index": bool(np.array_equal(theirs, wrong_index))}
# --8<-- [end:row_crossing]


# --8<-- [start:flush]
def bf16_flush_to_zero():
    """FP4 codes under a normal absmax of 1e-37: the products are float32 subnormals."""
    from qlora_ref import QuantState, dequantize_4bit
    from qlora_ref.blockwise import pack_4bit
    from qlora_ref.codebooks import codebook

    codes = np.tile(np.arange(16, dtype=np.uint8), 6)  # 96 values: a multiple of 16
    state = QuantState(shape=(96,), dtype="bfloat16", blocksize=64, quant_type="fp4", codebook=codebook("fp4"),
                       absmax=np.array([1e-37, 1e-37], np.float32))
    packed = pack_4bit(codes, "fp4").reshape(-1, 1)
    theirs = _bnb_decode(packed, state, "bfloat16").astype(np.float32).reshape(-1)
    ours = dequantize_4bit(packed, state, dtype="bfloat16").astype(np.float32)
    subnormal = (ours != 0) & (np.abs(ours) < np.finfo(np.float32).tiny)
    return {"subnormal in the oracle": int(subnormal.sum()), "zero in bitsandbytes": int(np.sum(theirs[subnormal] == 0))}
# --8<-- [end:flush]


# --8<-- [start:negative_zero]
def scalar_fp4_negative_zero():
    """FP4 code 8 (the sign bit over a zero magnitude) on a (4, 30) weight: the native scalar loop."""
    from qlora_ref import QuantState, dequantize_4bit
    from qlora_ref.blockwise import pack_4bit
    from qlora_ref.codebooks import codebook

    codes = np.full(120, 8, np.uint8)
    state = QuantState(shape=(4, 30), dtype="float32", blocksize=64, quant_type="fp4", codebook=codebook("fp4"),
                       absmax=np.array([1.0, -1.0], np.float32))  # a double-quantized absmax can be negative
    packed = pack_4bit(codes, "fp4").reshape(-1, 1)
    theirs = _bnb_decode(packed, state, "float32").reshape(-1)
    ours = dequantize_4bit(packed, state, dtype="float32").reshape(-1)
    return {"oracle signs": sorted(set(np.signbit(ours).tolist())), "bitsandbytes -0.0 under +absmax":
            bool(np.all(np.signbit(theirs[:64]))), "bitsandbytes +0.0 under -absmax": bool(not np.any(np.signbit(theirs[64:])))}
# --8<-- [end:negative_zero]


# --8<-- [start:shape]
def one_dimensional_shape():
    """A 1-D state of 384 values decoded by the native loop comes back as (1, 384)."""
    from qlora_ref import quantize_4bit

    packed, state = quantize_4bit(np.linspace(-1, 1, 384, dtype=np.float32), blocksize=64)
    return {"shape": tuple(_bnb_decode(packed, state, "float32").shape), "expected": state.shape}
# --8<-- [end:shape]


# --8<-- [start:repacking]
def linear4bit_repacking():
    """Linear4bit, as its eval forward without grad repacks it on an AVX512-BF16 CPU."""
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128, dtype=torch.bfloat16), requires_grad=False,
                                     blocksize=64, compress_statistics=True, quant_type="nf4")
    layer = layer.to("cpu").eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    # The first thing forward does when layer.support_avx512bf16_for_cpu is set (pure torch):
    layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state)
    after = layer.state_dict()
    meta = bytes(after["weight.quant_state.bitsandbytes__nf4"].tolist()).decode()
    return {"changed entries": sorted(k for k in before if not torch.equal(before[k], after[k])),
            "nested_dtype bfloat16": '"nested_dtype": "bfloat16"' in meta,
            "repacks on this CPU": bool(bnb.functional.has_avx512bf16())}
# --8<-- [end:repacking]


# --8<-- [start:compiled_torchao]
def compiled_torchao_decode():
    """torchao's NF4Tensor of a (64, 256) bfloat16 weight decoded eagerly and under torch.compile (CPU)."""
    import torch
    from torch._inductor import config as inductor
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    from qlora_ref import dequantize_4bit
    from qlora_ref.conformance.providers.torch_arrays import to_numpy
    from qlora_ref.conformance.variants import same_bits, torchao_float32_intermediates
    from qlora_ref.torchao_nf4 import quantize_torchao

    torch.manual_seed(0)
    W = torch.randn(64, 256, dtype=torch.bfloat16)  # the smallest NF4Tensor: 64 * 256 elements
    nf4 = to_nf4(W, 64, 256)
    packed, state = quantize_torchao(to_numpy(W), mean=to_numpy(nf4.scaler_mean)[()])  # the oracle's encoding
    ours = dequantize_4bit(packed, state, dtype="bfloat16")
    rule = torchao_float32_intermediates(packed, state, "bfloat16")  # float32 throughout, one rounding

    eager = to_numpy(nf4.get_original_weight())
    seen = {"same codes": bool(np.array_equal(to_numpy(nf4.quantized_data).reshape(-1), packed.reshape(-1))),
            "eager differs in": int(np.sum(~same_bits(eager, ours))), "of": W.numel(),
            "rule differs in": int(np.sum(~same_bits(rule, ours))), "compiled": {}}
    # Inductor's default kernel for this CPU, its 256-bit (AVX2) kernel, and the default with
    # precision casts emulated. Caches off: a cached kernel must not stand in for the one asked for.
    for label, options in [("default", {}), ("256-bit", {"cpp.simdlen": 256}),
                           ("emulate_precision_casts", {"emulate_precision_casts": True})]:
        torch.compiler.reset()
        with inductor.patch(force_disable_caches=True, **options):
            isa = str(pick_vec_isa()) or "scalar"
            y = to_numpy(torch.compile(lambda t: t.get_original_weight())(nf4))
        seen["compiled"][label] = {"kernel": isa, "differs in": int(np.sum(~same_bits(y, ours))),
                                   "equals the rule": bool(same_bits(y, rule).all())}
    torch.compiler.reset()
    return seen
# --8<-- [end:compiled_torchao]


FINDINGS = {
    "row-crossing absmax": row_crossing_absmax,
    "bf16 flush to zero": bf16_flush_to_zero,
    "fp4 negative zero": scalar_fp4_negative_zero,
    "1-D shape": one_dimensional_shape,
    "Linear4bit repacking": linear4bit_repacking,
    "compiled torchao decode": compiled_torchao_decode,
}

if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    for name, run in FINDINGS.items():
        print(f"{name}: {run()}")
