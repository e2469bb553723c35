"""PEFT adapter folders: reading (ranks, alphas, rsLoRA, DoRA), matching to a checkpoint, the
oracle's layer forward and merged weight, every malformed folder refused by name; and
``qlora-ref inspect``. PEFT itself is the comparator in tests/test_checkpoint.py."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.numpy import save_file
from tolerances import assert_bit_equal

from qlora_ref import quantize_4bit
from qlora_ref.cli import main
from qlora_ref.dora import dora_forward, dora_merge
from qlora_ref.formats.checkpoint import read_checkpoint, write_checkpoint
from qlora_ref.formats.peft import (
    adapter_forward,
    match_adapter,
    merged_weight,
    read_adapter,
)
from qlora_ref.lora import lora_forward, lora_merge
from qlora_ref.qlora import qlora_base_weight

P = "base_model.model."


def _adapter(path, tensors, **config):
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": False, "use_dora": False}
    cfg.update(config)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def _lora(rng, module, out_f, in_f, r=4, dora=False):
    t = {f"{P}{module}.lora_A.weight": rng.standard_normal((r, in_f)).astype(np.float32),
         f"{P}{module}.lora_B.weight": rng.standard_normal((out_f, r)).astype(np.float32) * 0.1}
    if dora:
        t[f"{P}{module}.lora_magnitude_vector"] = (1 + rng.random(out_f)).astype(np.float32)
    return t


@pytest.fixture
def model(tmp_path):
    """A checkpoint with a 4-bit q_proj (bias in the file) and a dense v_proj."""
    rng = np.random.default_rng(0)
    Wq = rng.standard_normal((16, 32)).astype(np.float32)
    Wv = rng.standard_normal((8, 32)).astype(np.float32)
    write_checkpoint(tmp_path / "model.safetensors", {"m.q_proj": quantize_4bit(Wq, double_quant=True)},
                     {"m.q_proj.bias": rng.standard_normal(16).astype(np.float32), "m.v_proj.weight": Wv})
    return read_checkpoint(tmp_path)


def test_ranks_alphas_and_rslora(tmp_path):
    rng = np.random.default_rng(1)
    t = {**_lora(rng, "m.q_proj", 16, 32, r=4), **_lora(rng, "m.v_proj", 8, 32, r=2)}
    a = read_adapter(_adapter(tmp_path / "a", t, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3}))
    assert (a.layers["m.q_proj"].r, a.layers["m.q_proj"].scaling) == (4, 2.0)
    assert (a.layers["m.v_proj"].r, a.layers["m.v_proj"].alpha, a.layers["m.v_proj"].scaling) == (2, 3.0, 1.5)
    b = read_adapter(_adapter(tmp_path / "b", t, use_rslora=True, rank_pattern={"v_proj": 2}))
    assert b.layers["m.q_proj"].scaling == 8 / 2.0 and b.layers["m.v_proj"].scaling == 8 / np.sqrt(2)


def test_forward_and_merge_equal_the_oracle_functions(tmp_path, model):
    rng = np.random.default_rng(2)
    adapter = read_adapter(_adapter(tmp_path / "a", {**_lora(rng, "m.q_proj", 16, 32), **_lora(rng, "m.v_proj", 8, 32)}))
    assert match_adapter(adapter, model) == {"m.q_proj": "4bit", "m.v_proj": "dense"}
    x = rng.standard_normal((3, 32)).astype(np.float32)
    q, layer = model.layers["m.q_proj"], adapter.layers["m.q_proj"]
    W = qlora_base_weight(q.packed, q.state, compute_dtype="bfloat16")
    expected = lora_forward(x, W, layer.A, layer.B, scaling=2.0, bias=model.tensors["m.q_proj.bias"])
    assert_bit_equal(adapter_forward(adapter, model, "m.q_proj", x, compute_dtype="bfloat16"), expected, "forward")
    W32 = qlora_base_weight(q.packed, q.state, compute_dtype="float32")
    assert_bit_equal(merged_weight(adapter, model, "m.q_proj"), lora_merge(W32, layer.A, layer.B, 2.0), "merged")
    v = adapter.layers["m.v_proj"]
    assert_bit_equal(adapter_forward(adapter, model, "m.v_proj", x),
                     lora_forward(x, model.tensors["m.v_proj.weight"], v.A, v.B, scaling=2.0), "dense forward")


def test_dora_layers(tmp_path, model):
    rng = np.random.default_rng(3)
    adapter = read_adapter(_adapter(tmp_path / "a", _lora(rng, "m.q_proj", 16, 32, dora=True), use_dora=True))
    layer, q = adapter.layers["m.q_proj"], model.layers["m.q_proj"]
    assert layer.use_dora
    x = rng.standard_normal((2, 32)).astype(np.float32)
    W = qlora_base_weight(q.packed, q.state, compute_dtype="float32")
    assert_bit_equal(adapter_forward(adapter, model, "m.q_proj", x, compute_dtype="float32"),
                     dora_forward(x, W, layer.A, layer.B, layer.magnitude, scaling=2.0, bias=model.tensors["m.q_proj.bias"]),
                     "DoRA forward")
    assert_bit_equal(merged_weight(adapter, model, "m.q_proj"),
                     dora_merge(W, layer.A, layer.B, layer.magnitude, scaling=2.0), "DoRA merged")


@pytest.mark.parametrize("edit, pattern", [
    (lambda t, c: (t, {**c, "r": 8}), r"has rank 4, but adapter_config.json gives r = 8"),
    (lambda t, c: ({k: v for k, v in t.items() if "lora_B" not in k}, c), r"module 'm.q_proj' has no lora_B.weight"),
    (lambda t, c: ({**t, f"{P}m.q_proj.lora_B.weight": np.ones((16, 3), np.float32)}, c), r"lora_B.weight' has shape \(16, 3\)"),
    (lambda t, c: ({("x." + k): v for k, v in t.items()}, c), r"does not start with 'base_model.model.'"),
    (lambda t, c: ({**t, f"{P}m.q_proj.lora_embedding_A": np.ones((4, 3), np.float32)}, c), r"not a lora_A, lora_B or DoRA"),
    (lambda t, c: (t, {**c, "use_dora": True}), r"use_dora is set but module 'm.q_proj' has no lora_magnitude_vector"),
    (lambda t, c: ({**t, f"{P}m.q_proj.lora_magnitude_vector": np.ones(3, np.float32)}, c), r"DoRA needs \(16,\)"),
    (lambda t, c: (t, {**c, "fan_in_fan_out": True}), r"fan_in_fan_out"),
    (lambda t, c: (t, {k: v for k, v in c.items() if k != "lora_alpha"}), r"'lora_alpha' is None"),
    (lambda t, c: (t, {**c, "peft_type": "IA3"}), r"only LORA adapters"),
    (lambda t, c: ({**t, f"{P}m.q_proj.lora_A.weight": np.full((4, 32), np.nan, np.float32)}, c), r"NaN or Inf"),
])
def test_malformed_adapters_are_refused_by_name(tmp_path, edit, pattern):
    rng = np.random.default_rng(4)
    tensors, config = edit(_lora(rng, "m.q_proj", 16, 32), {"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    path = tmp_path / "bad"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=pattern):
        read_adapter(path)


def test_missing_files_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_adapter(tmp_path)
    path = _adapter(tmp_path / "a", _lora(np.random.default_rng(5), "m.q_proj", 16, 32))
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        read_adapter(path)


def test_matching_errors(tmp_path, model):
    rng = np.random.default_rng(6)
    missing = read_adapter(_adapter(tmp_path / "a", _lora(rng, "m.k_proj", 16, 32)))
    with pytest.raises(ValueError, match="module 'm.k_proj' has no base weight"):
        match_adapter(missing, model)
    wrong = read_adapter(_adapter(tmp_path / "b", _lora(rng, "m.q_proj", 16, 40)))
    with pytest.raises(ValueError, match=r"base weight has shape \(16, 32\), but lora_B @ lora_A has shape \(16, 40\)"):
        adapter_forward(wrong, model, "m.q_proj", np.ones((1, 40), np.float32))


def test_inspect_command(tmp_path, model, capsys):
    rng = np.random.default_rng(7)
    path = _adapter(tmp_path / "a", {**_lora(rng, "m.q_proj", 16, 32), **_lora(rng, "m.v_proj", 8, 32, r=2)},
                    rank_pattern={"v_proj": 2}, use_rslora=True)
    assert main(["inspect", str(tmp_path), "--adapter", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"m\.q_proj\s+16x32\s+nf4\s+64\s+yes", out), out  # name, shape, type, block, double quant
    assert "1 4-bit weights, 512 parameters" in out
    assert re.search(r"m\.v_proj\s+2\s+8\s+5\.657\s+no\s+32\s+8\s+dense", out), out
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in data["adapter"]["rows"]] == [4, 2]
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2


# -- qlora_gpu.save_peft_adapter: the fast path's layers written as an adapter folder -----------


def test_save_peft_adapter_reads_back_with_every_layer_scaling(tmp_path):
    """Layers of different rank and alpha keep their own scaling through rank/alpha patterns,
    and the oracle's reader returns the adapters bit for bit."""
    torch = pytest.importorskip("torch")
    import qlora_gpu

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32),
                                torch.nn.Linear(32, 16))
    qlora_gpu.replace_linear_with_qlora(model, ["0", "2"], r=4, alpha=8, compute_dtype=torch.float32)
    qlora_gpu.replace_linear_with_qlora(model, ["3"], r=2, alpha=16, compute_dtype=torch.float32)
    for layer in model.modules():
        if isinstance(layer, qlora_gpu.QLoRALinear):
            torch.nn.init.normal_(layer.lora_B.weight)   # B = 0 would hide a swapped A and B
    adapter = read_adapter(qlora_gpu.save_peft_adapter(model, tmp_path / "adapter"))
    assert sorted(adapter.layers) == ["0", "2", "3"]
    for name, layer in adapter.layers.items():
        mine = model.get_submodule(name)
        assert (layer.r, layer.alpha, layer.scaling) == (mine.r, mine.alpha, mine.scaling)
        assert_bit_equal(layer.A, mine.lora_A.weight.detach().numpy(), "A")
        assert_bit_equal(layer.B, mine.lora_B.weight.detach().numpy(), "B")


def test_save_peft_adapter_refuses_what_one_config_cannot_hold(tmp_path):
    torch = pytest.importorskip("torch")
    import qlora_gpu

    with pytest.raises(ValueError, match="no QLoRALinear"):
        qlora_gpu.save_peft_adapter(torch.nn.Linear(4, 4), tmp_path / "a")
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    qlora_gpu.replace_linear_with_qlora(model, ["0"], r=2, rslora=True, compute_dtype=torch.float32)
    qlora_gpu.replace_linear_with_qlora(model, ["1"], r=2, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="rslora"):
        qlora_gpu.save_peft_adapter(model, tmp_path / "b")


def test_inspect_says_when_a_file_has_no_4bit_weights(tmp_path, capsys):
    path = tmp_path / "dense.safetensors"
    save_file({"model.embed_tokens.weight": np.zeros((4, 8), np.float32)}, str(path))
    assert main(["inspect", str(path)]) == 1
    assert "no 4-bit weights" in capsys.readouterr().out
    assert main(["inspect", str(path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["checkpoint"]["rows"] == []


def test_inspect_json_gives_numbers_as_numbers(tmp_path, capsys):
    write_checkpoint(str(tmp_path / "m.safetensors"), {"proj": quantize_4bit(np.ones((64, 256), np.float32),
                                                                              double_quant=True)})
    assert main(["inspect", str(tmp_path / "m.safetensors"), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["checkpoint"]["rows"]
    assert isinstance(row["bits/param"], float) and isinstance(row["stored bytes"], int)
