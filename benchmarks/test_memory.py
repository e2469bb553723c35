"""Memory: stored bytes of every format and scheme, and what one layer's forward+backward keeps.

Not timed. Stored bytes are summed from each provider's real buffers and must equal the formula
(``qlora_ref.memory.quantized_tensor_nbytes``; ``benchmarks.memory_model.torchao_nbytes``). The
layer's saved tensors are counted with saved-tensor hooks and must equal Note: one layer's
memory formula (``benchmarks/memory_model.py``); on CUDA what the forward and backward
allocates at its peak is recorded beside the formula's (the target is within 5%, reported, not
asserted).
"""

import pytest

from benchmarks import cases
from benchmarks.checks import CHECK_ELEMENTS
from benchmarks.memory_model import layer_memory, stored_format_rows


def test_stored_bytes(bench_run, ceilings, workspace, shape_key):
    rows, skipped = stored_format_rows(workspace.weight(shape_key), shape_key, oracle_limit=CHECK_ELEMENTS)
    bench_run.memory["stored"].extend(rows)
    bench_run.memory.setdefault("stored_skipped", []).extend([{"shape": shape_key, "what": w, "reason": r}
                                                              for w, r in skipped])
    for r in rows:
        bench_run.say(f"stored {shape_key} {r['provider']} {r['quant_type']} {r['scheme']}: {r['nbytes']} bytes, "
                      f"{r['bits_per_parameter']:.4f} bits/parameter (formula {r['formula_nbytes']})")
    bad = [r for r in rows if r["nbytes"] != r["formula_nbytes"]]
    assert not bad, f"stored bytes differ from the formula: {bad}"


@pytest.mark.parametrize("provider", cases.PROVIDERS["layer"])
def test_layer_memory(bench_run, ceilings, workspace, shape_key, provider):
    case = cases.make_layer(workspace, provider, shape_key, cases.QUICK_LAYER_TOKENS[0])
    if case.skip:
        pytest.skip(case.skip)
    m = layer_memory(case, workspace)
    bench_run.memory["layer"].append(m)
    text = f"saved {m['saved_bytes']} bytes (formula {m['formula']['saved']})"
    if "cuda" in m:
        text += f", step allocates {m['cuda']['added']} bytes (formula {m['formula']['added']})"
    bench_run.say(f"layer memory {shape_key} {provider} at {m['tokens']} tokens: {text}")
    if case.label.endswith("+compile"):
        return  # torch.compile's partitioner chooses what to save: measured and reported, not modelled
    assert m["saved_bytes"] == m["formula"]["saved"], f"saved tensors: {m['saved_tensors']}"
