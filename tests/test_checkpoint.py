"""Real checkpoints: a tiny Llama saved by transformers + bitsandbytes in NF4 with double
quantization, and a PEFT adapter trained on it, read back with the oracle.

The fixture is made offline on CPU: a random ``LlamaConfig`` model (hidden 64, 2 layers, vocab
128) is saved, reloaded with ``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant)`` and
saved again with ``save_pretrained``; PEFT adapters are trained a few steps and saved. Nothing
runs an eval forward before saving (docs/spec.md, section 5.3, the CPU repacking hazard).
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest
from tolerances import (
    as_numpy,
    assert_bit_equal,
    assert_derived,
    assert_within,
    derived_budget,
)

from qlora_ref.formats.checkpoint import read_checkpoint, write_checkpoint
from qlora_ref.formats.peft import (
    Adapter,
    adapter_forward,
    match_adapter,
    merged_weight,
    read_adapter,
)


def _bnb_decode(sd: dict, layer: str):
    """bitsandbytes' own decode of one layer's state-dict entries (torch tensors)."""
    import bitsandbytes.functional as F
    import torch

    prefix = f"{layer}.weight."
    qs = F.QuantState.from_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)},
                                device=torch.device("cpu"))
    return F.dequantize_4bit(sd[f"{layer}.weight"], qs)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "base")
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(
            root / "base", quantization_config=bnb_config, device_map="cpu", dtype=torch.bfloat16)

    model = load()
    model.save_pretrained(root / "q4")  # before any forward: the hazard cannot arise

    def train(model, config, name):
        pm = peft.get_peft_model(model, config)
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
        pm.train()
        for _ in range(3):
            pm(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        pm.save_pretrained(root / name)
        return pm

    lora = train(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                        target_modules=["q_proj", "v_proj", "down_proj"]), "lora")
    dora = train(load(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=True, use_dora=True,
                                         rank_pattern={"v_proj": 2}, target_modules=["q_proj", "v_proj"]), "dora")
    return {"root": root, "lora": lora, "dora": dora}


def test_every_4bit_weight_decodes_bit_identically_to_bitsandbytes(llama):
    from safetensors.torch import load_file

    ckpt = read_checkpoint(llama["root"] / "q4")
    sd = load_file(llama["root"] / "q4" / "model.safetensors")
    linear = {k[: -len(".weight.quant_state.bitsandbytes__nf4")] for k in sd if k.endswith("bitsandbytes__nf4")}
    assert sorted(ckpt.layers) == sorted(linear) and len(linear) == 2 * 7  # q k v o gate up down per layer
    for name, layer in ckpt.layers.items():
        assert layer.state.quant_type == "nf4" and layer.state.double_quant and layer.state.blocksize == 64
        assert_bit_equal(layer.weight(), as_numpy(_bnb_decode(sd, name)), f"{name} decoded")
    assert "lm_head.weight" in ckpt.tensors and "model.norm.weight" in ckpt.tensors


def test_rewritten_checkpoint_is_byte_identical(llama, tmp_path):
    src = llama["root"] / "q4" / "model.safetensors"
    ckpt = read_checkpoint(src)
    write_checkpoint(tmp_path / "copy.safetensors", ckpt.layers, ckpt.tensors, metadata=ckpt.metadata)
    assert (tmp_path / "copy.safetensors").read_bytes() == src.read_bytes()


def _peft_module(pm, name):
    module = pm.base_model.model
    for part in name.split("."):
        module = getattr(module, part)
    return module


def _check_layer_outputs(llama, which):
    """Each adapted layer's output from the oracle against PEFT's, in the derived tier."""
    import torch

    ckpt = read_checkpoint(llama["root"] / "q4")
    adapter = read_adapter(llama["root"] / which)
    pm = llama[which]
    assert set(match_adapter(adapter, ckpt).values()) == {"4bit"}
    rng = np.random.default_rng(0)
    for module, layer in adapter.layers.items():
        peft_layer = _peft_module(pm, module)
        in_features = layer.A.shape[1]
        x = torch.from_numpy(rng.standard_normal((2, 5, in_features)).astype(np.float32)).to(torch.bfloat16)
        pm.train()  # training mode: bitsandbytes does not repack for its AVX-512 kernel (the hazard)
        with torch.no_grad():
            y_peft = peft_layer(x)
        x_np = as_numpy(x)
        ref = adapter_forward(adapter, ckpt, module, x_np, compute_dtype="bfloat16")  # float64
        # The baseline: the same layer computed plainly in bfloat16 with torch.
        W = torch.from_numpy(ckpt.layers[module].weight("float32")).to(torch.bfloat16)
        A = torch.from_numpy(layer.A.astype(np.float32)).to(torch.bfloat16)
        B = torch.from_numpy(layer.B.astype(np.float32)).to(torch.bfloat16)
        if layer.use_dora:
            V = W.float() + layer.scaling * (B.float() @ A.float())
            c = torch.from_numpy(layer.magnitude.astype(np.float32)) / V.norm(dim=1)
            baseline = (x @ (c[:, None] * V).to(torch.bfloat16).T)
        else:
            baseline = x @ W.T + (layer.scaling * ((x @ A.T) @ B.T)).to(torch.bfloat16)
        # ulps=1: the output's own rounding to bf16 is half an ulp; the rest of the budget is
        # twice the plain bf16 baseline's error.
        budget = derived_budget(ref, baseline.float(), dtype=ml_dtypes.bfloat16, ulps=1.0)
        assert_within(y_peft.float(), ref, budget, f"{which} {module} output")
        # The budget has teeth: an oracle with the scaling 25% off (alpha / r for an rsLoRA
        # adapter of rank 4 would be 50% off) lands outside it.
        off = Adapter(adapter.path, adapter.config, {module: dataclasses.replace(layer, scaling=1.25 * layer.scaling)})
        with pytest.raises(AssertionError, match="exceeds the budget"):
            assert_within(y_peft.float(), adapter_forward(off, ckpt, module, x_np, compute_dtype="bfloat16"), budget)


def test_lora_layer_outputs_match_peft(llama):
    _check_layer_outputs(llama, "lora")


def test_dora_rslora_layer_outputs_match_peft(llama):
    adapter = read_adapter(llama["root"] / "dora")
    ranks = {m: (layer.r, layer.scaling, layer.use_dora) for m, layer in adapter.layers.items()}
    assert ranks["model.layers.0.self_attn.v_proj"] == (2, 8 / np.sqrt(2), True)  # rank_pattern, rsLoRA
    assert ranks["model.layers.0.self_attn.q_proj"] == (4, 8 / 2.0, True)
    _check_layer_outputs(llama, "dora")


def test_merged_weight_matches_peft_delta(llama):
    import torch

    ckpt = read_checkpoint(llama["root"] / "q4")
    adapter = read_adapter(llama["root"] / "lora")
    for module in list(adapter.layers)[:3]:
        peft_layer = _peft_module(llama["lora"], module)
        delta = peft_layer.get_delta_weight("default").float()  # s B A in float32
        W = torch.from_numpy(ckpt.layers[module].weight("float32"))
        ref = merged_weight(adapter, ckpt, module)
        layer = adapter.layers[module]
        exact = ckpt.layers[module].weight("float32").astype(np.float64) + layer.scaling * (
            layer.B.astype(np.float64) @ layer.A.astype(np.float64))
        assert_bit_equal(ref, exact, f"{module} merged")
        assert_derived(W + delta, ref, W + delta, dtype=np.float32, what=f"{module} merged vs PEFT")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("storage", ["uint8", "bfloat16"])
def test_bitsandbytes_layer_files_round_trip(tmp_path, quant_type, double_quant, storage):
    """A Linear4bit state dict saved by safetensors is read, decoded as bitsandbytes decodes it,
    and written back byte for byte (quant_storage kept)."""
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    from bnb_cpu import bnb_decoded
    from bnb_cpu import decode_model as bnb_decode_model
    from safetensors.torch import save_file

    from qlora_ref.blockwise import unpack_4bit
    from qlora_ref.conformance.variants import decode_model
    from qlora_ref.double_quant import dequantize_absmax

    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        layer = bnb.nn.Linear4bit(96, 40, bias=True, compute_dtype=dtype, compress_statistics=double_quant,
                                  quant_type=quant_type, quant_storage=getattr(torch, storage))
        layer.weight = bnb.nn.Params4bit(torch.randn(40, 96, dtype=dtype), requires_grad=False, blocksize=64,
                                         compress_statistics=double_quant, quant_type=quant_type,
                                         quant_storage=getattr(torch, storage))
        layer = layer.to("cpu")
        sd = {f"m.{k}": v for k, v in layer.state_dict().items()}
        save_file(sd, tmp_path / "a.safetensors", metadata={"format": "pt"})
        ckpt = read_checkpoint(tmp_path / "a.safetensors")
        write_checkpoint(tmp_path / "b.safetensors", ckpt.layers, ckpt.tensors, metadata=ckpt.metadata)
        assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()
        assert ckpt.layers["m"].storage_dtype.name == storage and list(ckpt.tensors) == ["m.bias"]
        ours, theirs = ckpt.weight("m.weight"), as_numpy(_bnb_decode(sd, "m"))
        # bitsandbytes decodes by the path of this machine's CPU (tests/bnb_cpu.py): the oracle's
        # run of that model must give its bits; the oracle's own decode is the plain model.
        layer_state = ckpt.layers["m"].state
        absmax = layer_state.absmax if layer_state.absmax is not None else dequantize_absmax(layer_state.nested)
        codes = unpack_4bit(ckpt.layers["m"].packed, layer_state.numel)
        assert_bit_equal(bnb_decoded(codes, absmax, (40, 96), 64, quant_type, ours.dtype), theirs,
                         f"{dtype} decoded as bitsandbytes' {bnb_decode_model()!r} path")
        assert_bit_equal(ours, decode_model("oracle", codes, absmax, (40, 96), 64, quant_type, ours.dtype),
                         f"{dtype} decoded by the oracle")


def test_sharded_folder(tmp_path):
    import json

    from qlora_ref import quantize_4bit

    W = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    write_checkpoint(tmp_path / "model-00001-of-00002.safetensors", {"a": quantize_4bit(W, double_quant=True)})
    write_checkpoint(tmp_path / "model-00002-of-00002.safetensors", {"b": quantize_4bit(W, quant_type="fp4")},
                     {"b.bias": np.ones(16, np.float32)})
    keys = {**{k: "model-00001-of-00002.safetensors" for k in read_checkpoint(tmp_path / "model-00001-of-00002.safetensors").layers["a"].keys},
            **{k: "model-00002-of-00002.safetensors" for k in read_checkpoint(tmp_path / "model-00002-of-00002.safetensors").layers["b"].keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keys}))
    ckpt = read_checkpoint(tmp_path)
    assert sorted(ckpt.layers) == ["a", "b"] and len(ckpt.files) == 2 and list(ckpt.tensors) == ["b.bias"]
    assert ckpt.layers["b"].state.quant_type == "fp4"
