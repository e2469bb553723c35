"""QLoRA under FSDP2: two gloo processes on CPU against one process, on a small Llama.

A transformers ``LlamaForCausalLM`` (hidden 64, 2 layers, vocab 128) has all seven projections of
each layer replaced by ``QLoRALinear`` (NF4, double quantization, block 64), then
``fully_shard`` is applied to each decoder layer and to the model. The two processes are spawned
once for the module (``torch.multiprocessing``, gloo); every case runs inside that one spawn and
the ranks write what they saw to files, which the tests compare with runs in this process.

Note: FSDP equality tiers
    - Same batch on both ranks: FSDP gathers the stored bytes, so each rank computes exactly
      what one process computes, and the reduce-scatter averages two equal float32 gradients
      (``(g + g) / 2 == g`` exactly). Loss, logits, every adapter gradient and the adapters
      after an AdamW step are compared bit for bit: in float32, with mixed precision (bfloat16
      parameters, float32 reduction; the one-process run casts its floating parameters to
      bfloat16, as the policy does) and with CPU offload.
    - Data parallel (each rank half of the batch): the loss and the gradients are means over
      tokens summed in another order (per half, then across ranks), so they are held to the
      derived tier: error against a float64 run of the same model at most twice the error of
      the one-process float32 run, plus 4 float32 ulps of the largest magnitude. Logits are per
      token; they are held to the same tier (a matmul's row may depend on the row count).
    - PEFT on the checkpoint loaded by transformers + bitsandbytes: the derived tier against the
      float64 run of the same files, with the sharded run's float32 logits as the baseline.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

import torch.distributed.checkpoint as dcp  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tolerances import assert_bit_equal, assert_derived  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard  # noqa: E402

from qlora_gpu import QLoRALinear, replace_linear_with_qlora  # noqa: E402
from qlora_gpu.fsdp import full_state_dict, load_full_state_dict, rank_nbytes  # noqa: E402
from qlora_gpu.model import save_peft_adapter  # noqa: E402
from qlora_ref.formats.peft import read_adapter  # noqa: E402

WORLD_SIZE = 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, LR = 4, 8, 1e-2
BATCH, SEQ, VOCAB = 4, 12, 128


def _llama(adapter_seed: int = 1, compute_dtype=torch.float32):
    """The model of every run: base weights from seed 0, adapters from ``adapter_seed`` (with
    ``B`` drawn too, so that gradients reach ``A`` and outputs depend on both)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    replace_linear_with_qlora(model, TARGETS, r=R, alpha=ALPHA, compute_dtype=compute_dtype)
    torch.manual_seed(adapter_seed)
    for m in model.modules():
        if isinstance(m, QLoRALinear):
            m.reset_lora_parameters()
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    return model


def _tokens():
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))


def _shard(model, **policy):
    for layer in model.model.layers:
        fully_shard(layer, **policy)
    fully_shard(model, **policy)
    return model


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _adapters(model):
    """The adapters as whole tensors (every rank must call it: it all-gathers)."""
    return {n: _full(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}


def _step(model, ids, optimizer=None):
    """Forward, backward and (optionally) an optimizer step; what the tests compare."""
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: _full(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}
    result = dict(loss=out.loss.detach(), logits=out.logits.detach(), grads=grads)
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad()
        result["adapters"] = _adapters(model)
    return result


def _peft_tensors(folder):
    """A PEFT adapter folder's tensors under the model's own names."""
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model."): v for k, v in tensors.items()}


def _optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


# -- what the ranks run ------------------------------------------------------------------------


def _case_same_batch(rank, folder):
    model = _shard(_llama())
    bytes_before = rank_nbytes(model)
    optimizer = _optimizer(model)
    result = _step(model, _tokens(), optimizer)
    result["bytes"] = vars(bytes_before)
    result["local_packed"] = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()
                              if n.endswith("proj.weight")}
    # A sharded checkpoint with the optimizer state, then a whole one in bitsandbytes' layout.
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=folder / "dcp")
    full = full_state_dict(model)
    if rank == 0:
        (folder / "bnb").mkdir()
        save_file({k: v for k, v in full.items() if ".lora_" not in k}, str(folder / "bnb" / "model.safetensors"))
        config = model.config.to_dict()
        config["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32).to_dict()
        (folder / "bnb" / "config.json").write_text(json.dumps(config))
        save_peft_adapter(model, folder / "adapter", state_dict=full)
    dist.barrier()  # the files exist before any rank reads them
    # The next step, to compare with runs resumed from the checkpoints.
    result["next"] = _step(model, _tokens().flip(0), optimizer)
    return result


def _other_model():
    """A sharded model with other adapters and zeroed 4-bit codes: only a checkpoint can fix it."""
    model = _shard(_llama(adapter_seed=7))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QLoRALinear):
                m.weight.to_local().zero_()
    return model


def _case_resumed_from_dcp(rank, folder):
    model = _other_model()
    optimizer = _optimizer(model)
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=folder / "dcp")
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return dict(loaded=_adapters(model), next=_step(model, _tokens().flip(0), optimizer))


def _case_loaded_from_full(rank, folder):
    """Every rank reads the whole files (bitsandbytes layout + PEFT adapter) into its shards."""
    model = _other_model()
    state = load_file(str(folder / "bnb" / "model.safetensors"))
    state.update(_peft_tensors(folder / "adapter"))
    load_full_state_dict(model, state)
    return dict(loaded=_adapters(model), next=_step(model, _tokens().flip(0)))


def _case_data_parallel(rank, folder):
    half = BATCH // WORLD_SIZE
    return _step(_shard(_llama()), _tokens()[rank * half:(rank + 1) * half])


def _case_mixed_precision(rank, folder):
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = _shard(_llama(compute_dtype=torch.bfloat16), mp_policy=policy)
    result = _step(model, _tokens(), _optimizer(model))
    result["param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    return result


def _case_cpu_offload(rank, folder):
    model = _shard(_llama(), offload_policy=CPUOffloadPolicy(pin_memory=False))
    return _step(model, _tokens(), _optimizer(model))


def _case_refuses_another_layout(rank, folder):
    """A sharded layer cannot change its layout in place: the error names it."""
    model = _shard(_llama())
    fp4 = QLoRALinear(64, 64, r=R, quant_type="fp4", double_quant=False).state_dict()
    try:
        model.model.layers[0].self_attn.q_proj.load_state_dict(fp4)
    except RuntimeError as exc:
        return str(exc)
    return None


CASES = {"same_batch": _case_same_batch, "resumed_from_dcp": _case_resumed_from_dcp,
         "loaded_from_full": _case_loaded_from_full, "data_parallel": _case_data_parallel,
         "mixed_precision": _case_mixed_precision, "cpu_offload": _case_cpu_offload,
         "refuses_another_layout": _case_refuses_another_layout}


def _worker(rank: int, folder: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share the CI machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {name: case(rank, Path(folder)) for name, case in CASES.items()}
        torch.save(results, Path(folder) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears the group down while another still uses it (gloo aborts)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Spawn the two ranks once; return their results and the folder they wrote."""
    folder = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(folder), _free_port()), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    return dict(folder=folder, results=results)


@pytest.fixture(scope="module")
def one_process():
    """The single-process run of the same model and batch, with the same optimizer."""
    model = _llama()
    optimizer = _optimizer(model)
    first = _step(model, _tokens(), optimizer)
    return dict(first=first, next=_step(model, _tokens().flip(0), optimizer))


def _assert_same_run(actual, expected, what):
    assert_bit_equal(actual["loss"], expected["loss"], f"{what}: loss")
    assert_bit_equal(actual["logits"], expected["logits"], f"{what}: logits")
    assert sorted(actual["grads"]) == sorted(expected["grads"]) and len(expected["grads"]) == 2 * 7 * 2
    for name, g in expected["grads"].items():
        assert_bit_equal(actual["grads"][name], g, f"{what}: gradient of {name}")
    for name, a in expected.get("adapters", {}).items():
        assert_bit_equal(actual["adapters"][name], a, f"{what}: {name} after an AdamW step")


# -- the tests ---------------------------------------------------------------------------------


def test_each_rank_holds_half_of_the_packed_bytes(ranks):
    whole = rank_nbytes(_llama())
    per_rank = [r["same_batch"]["bytes"] for r in ranks["results"]]
    for b in per_rank:
        assert 2 * b["packed"] == whole.packed, (b["packed"], whole.packed)
        assert 2 * b["absmax_codes"] == whole.absmax_codes
        assert 2 * b["adapters"] == whole.adapters
        assert b["constants"] == whole.constants  # replicated (Note: what FSDP shards)
    local = ranks["results"][0]["same_batch"]["local_packed"]
    model = _llama()
    assert local == {n: (p.shape[0] // 2, 1) for n, p in model.named_parameters() if n.endswith("proj.weight")}


def test_same_batch_equals_one_process_bit_for_bit(ranks, one_process):
    for rank, result in enumerate(ranks["results"]):
        _assert_same_run(result["same_batch"], one_process["first"], f"rank {rank}")
        _assert_same_run(result["same_batch"]["next"], one_process["next"], f"rank {rank}, second step")


def test_mixed_precision_equals_one_process_in_bfloat16(ranks):
    model = _llama(compute_dtype=torch.bfloat16)
    masters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # what the policy gathers: every floating parameter in bfloat16
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
    expected = _step(model, _tokens())
    # The policy reduces in float32 and steps the float32 masters with those gradients.
    expected["grads"] = {n: g.to(torch.float32) for n, g in expected["grads"].items()}
    params = [torch.nn.Parameter(masters[n]) for n in masters]
    for p, n in zip(params, masters):
        p.grad = expected["grads"][n]
    torch.optim.AdamW(params, lr=LR).step()
    expected["adapters"] = {n: p.detach() for n, p in zip(masters, params)}
    for rank, result in enumerate(ranks["results"]):
        got = result["mixed_precision"]
        assert got["logits"].dtype == torch.bfloat16 and got["param_dtypes"] == ["torch.float32", "torch.uint8"]
        _assert_same_run(got, expected, f"rank {rank}, bf16 policy")


def test_cpu_offload_equals_one_process_bit_for_bit(ranks, one_process):
    for rank, result in enumerate(ranks["results"]):
        _assert_same_run(result["cpu_offload"], one_process["first"], f"rank {rank}, CPU offload")


def test_data_parallel_is_within_the_derived_tier(ranks, one_process):
    expected = one_process["first"]
    ref64 = _step(_in_float64(_llama()), _tokens())
    ranks_out = [r["data_parallel"] for r in ranks["results"]]
    loss = (ranks_out[0]["loss"] + ranks_out[1]["loss"]) / 2  # equal halves: the mean of the means
    assert_derived(loss, ref64["loss"], expected["loss"], dtype=np.float32, what="loss")
    logits = torch.cat([r["logits"] for r in ranks_out])
    assert_derived(logits, ref64["logits"], expected["logits"], dtype=np.float32, what="logits")
    for name, g in expected["grads"].items():
        for rank, r in enumerate(ranks_out):
            assert_bit_equal(r["grads"][name], ranks_out[0]["grads"][name], f"{name}: rank {rank} vs rank 0")
        assert_derived(ranks_out[0]["grads"][name], ref64["grads"][name], g, dtype=np.float32,
                       what=f"gradient of {name}")


def test_a_dcp_checkpoint_resumes_the_run(ranks, one_process):
    saved = ranks["results"][0]["same_batch"]["adapters"]
    for rank, result in enumerate(ranks["results"]):
        for name, a in saved.items():
            assert_bit_equal(result["resumed_from_dcp"]["loaded"][name], a, f"rank {rank}: {name} loaded")
        # Same base bytes, adapters and AdamW moments: the next step is the uninterrupted one.
        _assert_same_run(result["resumed_from_dcp"]["next"], one_process["next"], f"rank {rank}, resumed")


def test_the_full_checkpoint_loads_into_a_sharded_model(ranks, one_process):
    saved = ranks["results"][0]["same_batch"]["adapters"]
    expected = {k: v for k, v in one_process["next"].items() if k != "adapters"}
    for rank, result in enumerate(ranks["results"]):
        for name, a in saved.items():
            assert_bit_equal(result["loaded_from_full"]["loaded"][name], a, f"rank {rank}: {name} loaded")
        _assert_same_run(result["loaded_from_full"]["next"], expected, f"rank {rank}, from the full checkpoint")


def _in_float64(model):
    """The same model computing in float64 (the 4-bit weights decode exactly): the reference of
    the derived tier."""
    model = model.to(torch.float64)  # QLoRALinear keeps its 4-bit state as stored
    for m in model.modules():
        if isinstance(m, QLoRALinear):
            m.compute_dtype = torch.float64
    return model


def _load_saved(folder):
    """One process: a fresh model loaded from the whole checkpoint and the PEFT adapter folder."""
    model = _llama(adapter_seed=7)
    result = model.load_state_dict(load_file(str(folder / "bnb" / "model.safetensors")), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys and all(".lora_" in k for k in result.missing_keys)
    adapter = _peft_tensors(folder / "adapter")
    assert sorted(adapter) == sorted(result.missing_keys)
    model.load_state_dict(adapter, strict=False)
    return model


def test_the_full_state_dict_and_adapter_load_on_one_process(ranks):
    folder = ranks["folder"]
    model = _load_saved(folder)
    base = _llama()
    for name, m in model.named_modules():
        if isinstance(m, QLoRALinear):
            assert_bit_equal(m.weight, base.get_submodule(name).weight, f"{name}: packed codes")
            assert_bit_equal(m.absmax, base.get_submodule(name).absmax, f"{name}: absmax codes")
    with torch.no_grad():
        logits = model(input_ids=_tokens().flip(0)).logits
    assert_bit_equal(logits, ranks["results"][0]["same_batch"]["next"]["logits"], "logits after loading")


def test_the_adapter_loads_in_peft_on_the_bitsandbytes_checkpoint(ranks):
    """transformers reads the whole checkpoint with bitsandbytes, PEFT the adapter folder: their
    logits are the sharded run's in the derived tier (bitsandbytes' CPU product is its own op,
    which may differ by machine; on the AVX-512 machine this was written on they were equal bit
    for bit)."""
    peft = pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")
    folder = ranks["folder"]
    base = transformers.AutoModelForCausalLM.from_pretrained(folder / "bnb", device_map="cpu", dtype=torch.float32)
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * len(TARGETS)
    for m in layers:  # no CPU repacking of the weight on AVX512-BF16 machines (docs/spec.md, section 5)
        m.support_avx512bf16_for_cpu = False
    model = peft.PeftModel.from_pretrained(base, folder / "adapter")
    with torch.no_grad():
        logits = model(input_ids=_tokens().flip(0)).logits
    ours = ranks["results"][0]["same_batch"]["next"]["logits"]
    with torch.no_grad():
        ref64 = _in_float64(_load_saved(folder))(input_ids=_tokens().flip(0)).logits
    assert_derived(logits, ref64, ours, dtype=np.float32, what="PEFT + bitsandbytes logits")
    adapter = read_adapter(folder / "adapter")  # and the oracle reads the folder
    assert len(adapter.layers) == 2 * len(TARGETS) and {a.scaling for a in adapter.layers.values()} == {ALPHA / R}


def test_a_sharded_layer_refuses_another_layout(ranks):
    for result in ranks["results"]:
        message = result["refuses_another_layout"]
        assert message is not None and "a sharded layer keeps its layout" in message and "fp4" in message


# -- one process: the helpers' contracts -------------------------------------------------------


def test_loading_a_state_dict_keeps_the_layers_tensors():
    """A checkpoint of the same layout is copied into the existing tensors (FSDP's handles)."""
    layer, other = QLoRALinear(64, 32, r=2), QLoRALinear(64, 32, r=2)
    tensors = [layer.weight, layer.absmax, layer.quant_map, layer.nested_offset, layer.lora_A.weight]
    layer.load_state_dict(other.state_dict())
    assert [layer.weight, layer.absmax, layer.quant_map, layer.nested_offset, layer.lora_A.weight] == tensors
    assert_bit_equal(layer.weight, other.weight, "packed codes")
    assert_bit_equal(layer.nested_absmax, other.nested_absmax, "nested absmax")
    assert type(layer.weight) is torch.nn.Parameter and layer.weight.dtype == torch.uint8
    assert not layer.weight.requires_grad and not layer.absmax.requires_grad


def test_rank_nbytes_on_one_process_counts_every_byte_once():
    model = _llama()
    held = rank_nbytes(model)
    every = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    assert held.total == every
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    assert held.packed == sum(m.weight.nbytes for m in layers) == sum(m.quant_state.packed_nbytes for m in layers)
    assert held.absmax_codes == sum(m.quant_state.n_blocks for m in layers)


def test_full_state_dict_without_a_process_group_is_the_state_dict():
    model = _llama()
    full = full_state_dict(model)
    assert list(full) == list(model.state_dict())
    for k, v in model.state_dict().items():
        assert_bit_equal(full[k], v, k)


def test_the_helpers_refuse_bad_input(tmp_path):
    layer = QLoRALinear(64, 32, r=2)
    with pytest.raises(TypeError, match="nn.Module"):
        rank_nbytes(layer.state_dict())
    with pytest.raises(TypeError, match="nn.Module"):
        full_state_dict("model")
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        load_full_state_dict(layer, [("weight", layer.weight)])
    with pytest.raises(RuntimeError, match="weight"):
        load_full_state_dict(QLoRALinear(32, 32, r=2), layer.state_dict())
    with pytest.raises(ValueError, match="no '0.lora_B.weight'"):
        save_peft_adapter(torch.nn.Sequential(layer), tmp_path / "c",
                          state_dict={"0.lora_A.weight": layer.lora_A.weight})
    with pytest.raises(TypeError, match="nn.Module"):
        save_peft_adapter({}, tmp_path / "d")


def test_per_rank_bytes_against_the_calculators_sharded_estimate(ranks):
    """The calculator's FSDP estimate (``qlora-ref memory --gpus N``) against the bytes measured
    on each rank. It divides every weight item by the number of GPUs; FSDP leaves the float32
    constants of the 4-bit layers whole (they are buffers, Note: what FSDP shards), so a rank
    holds the estimate plus the other half of those constants."""
    from qlora_ref.memory import FinetuneSetup, ModelShape, estimate_memory

    if "num_gpus" not in getattr(FinetuneSetup, "__dataclass_fields__", {}):
        pytest.skip("the memory calculator has no sharded estimate (FinetuneSetup.num_gpus, --gpus N) here")
    shape = ModelShape(name="test-llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, vocab_size=VOCAB)
    setup = FinetuneSetup(rank=R, adapter_dtype="float32", base_dtype="float32", num_gpus=WORLD_SIZE)
    estimate = estimate_memory(shape, setup)
    whole = rank_nbytes(_llama())
    for rank, result in enumerate(ranks["results"]):
        held = result["same_batch"]["bytes"]
        assert held["packed"] == estimate.item_bytes("linear weights: 4-bit codes"), f"rank {rank}: packed codes"
        assert held["adapters"] == estimate.item_bytes("LoRA adapters A, B"), f"rank {rank}: adapters"
        rotary = sum(b.nbytes for name, b in _llama().named_buffers() if "rotary" in name)  # whole on every rank
        assert held["other"] == (estimate.item_bytes("embeddings and head") + estimate.item_bytes("norms and biases")
                                 + rotary), f"rank {rank}: embeddings, head, norms"
        constants = held["absmax_codes"] + held["constants"]
        expected = estimate.item_bytes("linear weights: quantization constants") + whole.constants / WORLD_SIZE
        assert abs(constants - expected) <= 1, (f"rank {rank}: constants {constants} B, estimate + the replicated "
                                                f"half {expected} B")
