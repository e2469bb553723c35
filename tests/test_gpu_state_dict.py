"""State dicts in bitsandbytes' layout: qlora_gpu.bnb_format against the oracle and against
bitsandbytes itself, QLoRALinear through safetensors, and a real transformers + bitsandbytes
4-bit checkpoint made offline on CPU (docs/spec.md, section 5).

Exact tier throughout: same keys in the same order, same dtypes, shapes and bytes.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from strategies import bnb_quant_types, hard_arrays  # noqa: E402
from tolerances import assert_bit_equal  # noqa: E402

import qlora_gpu as G  # noqa: E402
import qlora_ref as R  # noqa: E402
from qlora_gpu import QLoRALinear  # noqa: E402
from qlora_gpu.bnb_format import from_bnb_state_dict, pack_json, to_bnb_state_dict  # noqa: E402
from qlora_gpu.state import tensor_from_numpy, tensor_to_numpy  # noqa: E402

bnb_format_ref = pytest.importorskip("qlora_ref.formats.bnb")


def assert_same_entries(actual: dict, expected: dict, what: str, ordered: bool = True):
    """Same keys (in the same order, unless ``ordered=False``: a file's order means nothing) and bits."""
    if ordered:
        assert list(actual) == list(expected), f"{what}: keys {list(actual)} != {list(expected)}"
    else:
        assert sorted(actual) == sorted(expected), f"{what}: keys {sorted(actual)} != {sorted(expected)}"
    for k in expected:
        assert_bit_equal(actual[k], expected[k], f"{what}[{k}]")


@given(x=hard_arrays(max_elements=1200, blocksize=64), quant_type=bnb_quant_types,
       double_quant=st.booleans(), blocksize=st.sampled_from([32, 64, 128]))
def test_entries_match_the_oracle_writer_and_reader(x, quant_type, double_quant, blocksize):
    packed, state = R.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    expected = bnb_format_ref.to_bnb_state_dict(packed, state)
    entries = to_bnb_state_dict(tensor_from_numpy(packed), G.QuantState.from_oracle(state))
    assert_same_entries(entries, expected, "to_bnb_state_dict")
    packed2, state2 = from_bnb_state_dict(entries)
    ref_packed, ref_state = bnb_format_ref.from_bnb_state_dict({k: tensor_to_numpy(v) for k, v in entries.items()})
    assert_bit_equal(packed2, ref_packed, "packed")
    assert_same_entries(to_bnb_state_dict(packed2, state2), bnb_format_ref.to_bnb_state_dict(ref_packed, ref_state),
                        "round trip")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_entries_match_bitsandbytes_as_dict(quant_type, double_quant):
    """Read bitsandbytes' own entries, write them back: every byte equal (JSON included)."""
    bnb_F = pytest.importorskip("bitsandbytes.functional")
    W = torch.randn(48, 100, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    packed, qs = bnb_F.quantize_4bit(W, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    theirs = {"weight": packed, **{f"weight.{k}": v for k, v in qs.as_dict(packed=True).items()}}
    ours_packed, ours_state = from_bnb_state_dict(theirs)
    assert_same_entries(to_bnb_state_dict(ours_packed, ours_state), theirs, "bitsandbytes entries")
    # Our decode of their state equals their decode, but for the sign of FP4's code 8: its
    # quant_map entry (which we use) is +0.0, bitsandbytes' CPU decoder without AVX-512 writes
    # -0.0 from the sign bit (as its CUDA decoder does; docs/spec.md, section 2.2).
    codes = G.unpack_4bit(packed, W.numel()).reshape(W.shape)
    theirs_decoded = bnb_F.dequantize_4bit(packed, qs)
    theirs_decoded = torch.where(codes == 8, theirs_decoded.abs(), theirs_decoded) if quant_type == "fp4" else theirs_decoded
    assert_bit_equal(G.dequantize_4bit(ours_packed, ours_state), theirs_decoded, "decode")
    if not double_quant:  # same absmax from our own quantizer, and the same codes (docs/spec.md, section 3) ...
        mine_packed, mine_state = G.quantize_4bit(W, blocksize=64, quant_type=quant_type)
        assert_bit_equal(mine_state.absmax, qs.absmax, "absmax")
        mine_codes = G.unpack_4bit(mine_packed, W.numel()).reshape(W.shape)
        differ = mine_codes != codes
        # ... except FP4's two zeros: the oracle's rule (midpoints strictly below) sends a tiny
        # positive value to code 8 and a tiny negative one to code 0, bitsandbytes' CPU encoder
        # the other way round by the sign bit; both decode to a zero.
        if quant_type == "fp4":
            assert bool(((mine_codes[differ] == 0) | (mine_codes[differ] == 8)).all())
            assert bool(((codes[differ] == 0) | (codes[differ] == 8)).all())
        else:
            assert not bool(differ.any())


def test_qlora_linear_saves_a_bitsandbytes_layer_back_identically():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    l4 = bnb.nn.Linear4bit(96, 40, bias=True, compute_dtype=torch.bfloat16, compress_statistics=True,
                           quant_type="nf4")
    l4.load_state_dict(linear.state_dict())
    theirs = l4.to("cpu").state_dict()
    layer = QLoRALinear.from_bnb_state_dict(theirs, r=4)
    ours = layer.state_dict()
    base = {k: v for k, v in ours.items() if not k.startswith("lora_")}
    assert_same_entries(base, dict(theirs), "Linear4bit state dict")
    assert list(ours)[-2:] == ["lora_A.weight", "lora_B.weight"]



def test_qlora_linear_keeps_the_quant_storage_dtype_it_loaded():
    # bitsandbytes' quant_storage (bfloat16 for FSDP1 with a bfloat16 model) stores the same
    # bytes as (nbytes // 2, 1) bfloat16: the layer computes on uint8 and saves bfloat16 back.
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    l4 = bnb.nn.Linear4bit(96, 40, bias=True, compute_dtype=torch.bfloat16, compress_statistics=True,
                           quant_type="nf4", quant_storage=torch.bfloat16)
    l4.load_state_dict(linear.state_dict())
    theirs = l4.to("cpu").state_dict()
    assert theirs["weight"].dtype == torch.bfloat16 and tuple(theirs["weight"].shape) == (96 * 40 // 4, 1)
    layer = QLoRALinear.from_bnb_state_dict(theirs, r=4)
    assert layer.weight.dtype == torch.uint8  # the frozen parameter FSDP shards
    base = {k: v for k, v in layer.state_dict().items() if not k.startswith("lora_")}
    assert_same_entries(base, dict(theirs), "Linear4bit state dict with quant_storage=bfloat16")
    # load_state_dict into a uint8 layer (same layout: copied in place) adopts the loaded storage,
    # and a uint8 dict loaded next brings uint8 back.
    other = QLoRALinear(96, 40, r=4)
    uint8_entries = other.state_dict()
    other.load_state_dict(dict(theirs, **{k: v for k, v in layer.state_dict().items() if k.startswith("lora_")}))
    assert_same_entries({k: v for k, v in other.state_dict().items() if not k.startswith("lora_")}, dict(theirs),
                        "loaded into a uint8 layer")
    # The saved weight is a view of the layer's codes, so loaders that write into it still work.
    assert other.state_dict()["weight"].untyped_storage().data_ptr() == other.weight.untyped_storage().data_ptr()
    other.load_state_dict(uint8_entries)
    assert other.state_dict()["weight"].dtype == torch.uint8
    assert_same_entries(other.state_dict(), uint8_entries, "uint8 entries loaded back")
    raw = theirs["weight"].reshape(-1).view(torch.uint8).reshape(-1, 1)
    as_uint8 = QLoRALinear.from_bnb_state_dict(dict(theirs, weight=raw), r=4)
    x = torch.randn(3, 96)
    assert torch.equal(layer(x), as_uint8(x))  # lora_B is zero in both: the same base


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False), ("int4", True)])
def test_state_dict_round_trips_through_safetensors(tmp_path, quant_type, double_quant):
    st_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    layer = QLoRALinear(80, 24, r=4, quant_type=quant_type, double_quant=double_quant, compute_dtype=torch.float32)
    torch.nn.init.normal_(layer.lora_B.weight)
    path = tmp_path / "layer.safetensors"
    st_torch.save_file(layer.state_dict(), str(path))
    loaded = st_torch.load_file(str(path))
    other = QLoRALinear(80, 24, r=4, quant_type="nf4", double_quant=not double_quant, compute_dtype=torch.float32)
    other.load_state_dict(loaded)  # strict: every key is known, none missing
    assert_same_entries(other.state_dict(), layer.state_dict(), "reloaded state dict")
    x = torch.randn(3, 80)
    assert torch.equal(other(x), layer(x))
    assert other.quant_state.quant_type == quant_type and other.quant_state.double_quant == double_quant


def test_loading_refuses_damaged_entries():
    layer = QLoRALinear(64, 16, r=2)
    good = layer.state_dict()
    bad_json = dict(good)
    bad_json["weight.quant_state.bitsandbytes__nf4"] = pack_json({"quant_type": "nf4", "blocksize": 64})
    with pytest.raises(RuntimeError, match="JSON lacks"):
        QLoRALinear(64, 16, r=2).load_state_dict(bad_json)
    short = dict(good, **{"weight.absmax": good["weight.absmax"][:-1]})
    with pytest.raises(RuntimeError, match="weight.absmax"):
        QLoRALinear(64, 16, r=2).load_state_dict(short)
    with pytest.raises(RuntimeError, match="shape"):
        QLoRALinear(32, 32, r=2).load_state_dict(good)
    missing = {k: v for k, v in good.items() if k != "weight.quant_map"}
    with pytest.raises(ValueError, match="missing key 'weight.quant_map'"):
        from_bnb_state_dict(missing)
    extra = dict(good, **{"weight.surprise": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected key"):
        from_bnb_state_dict(extra)
    wrong_map = dict(good, **{"weight.quant_map": good["weight.quant_map"] * 2})
    with pytest.raises(ValueError, match="codebook"):
        from_bnb_state_dict(wrong_map)


# ------------------------------------------------------- a real transformers checkpoint


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_4bit(tmp_path_factory):
    """A tiny random Llama saved in bf16, reloaded in 4 bits (NF4, double quantization) by
    transformers + bitsandbytes on CPU, and saved again: the file real QLoRA runs start from."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    st_torch = pytest.importorskip("safetensors.torch")
    root = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "bf16")
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.LlamaForCausalLM.from_pretrained(root / "bf16", quantization_config=quantization,
                                                          device_map="cpu", dtype=torch.bfloat16)
    model.save_pretrained(root / "nf4")  # before any forward (docs/spec.md, section 5.3)
    return dict(config=config, model=model, state_dict=st_torch.load_file(str(root / "nf4" / "model.safetensors")))


def _layer_entries(sd: dict, name: str) -> dict:
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def test_each_4bit_layer_of_a_transformers_checkpoint_loads_and_saves_back(llama_4bit):
    bnb_F = pytest.importorskip("bitsandbytes.functional")
    sd = llama_4bit["state_dict"]
    names = sorted({k.split(".weight.quant_state")[0] for k in sd if ".weight.quant_state." in k})
    assert len(names) == len(TARGETS)
    for name in names:
        entries = _layer_entries(sd, name)
        layer = QLoRALinear.from_bnb_state_dict(entries, r=8)
        # Our decode equals bitsandbytes' decode of the same file entries, bit for bit.
        qs = bnb_F.QuantState.from_dict({k: v for k, v in entries.items() if k.startswith("weight.")},
                                        device=torch.device("cpu"))
        assert_bit_equal(layer.dequantized_weight(torch.bfloat16),
                         bnb_F.dequantize_4bit(entries["weight"], qs).to(torch.bfloat16), f"{name} decode")
        saved = {k: v for k, v in layer.state_dict().items() if not k.startswith("lora_")}
        assert_same_entries(saved, entries, name, ordered=False)  # safetensors files sort their keys


def test_a_model_with_replaced_layers_loads_the_checkpoint(llama_4bit):
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM(llama_4bit["config"]).to(torch.bfloat16)
    names = G.replace_linear_with_qlora(model, TARGETS, r=4, compute_dtype=torch.bfloat16)
    result = model.load_state_dict(llama_4bit["state_dict"], strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(f"{n}.lora_{ab}.weight" for n in names for ab in "AB")
    ours = model.state_dict()
    for k, v in llama_4bit["state_dict"].items():
        assert_bit_equal(ours[k], v, k)
    tokens = torch.randint(0, 128, (1, 8))
    logits = model(tokens).logits  # fresh adapters: the 4-bit base model itself
    assert torch.isfinite(logits).all()
