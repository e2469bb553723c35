"""The memory calculator (``qlora_ref.memory``) against real buffers and published figures.

- weights: the bytes of the oracle's ``quantize_4bit`` states, of ``qlora_gpu.QLoRALinear``
  buffers, and of a transformers model loaded in 4-bit by bitsandbytes, layer by layer;
- adapters and optimizer state: PEFT's LoRA parameters, torch's and bitsandbytes' optimizers;
- activations: the tensors autograd saves in a transformers model with PEFT adapters, counted
  with ``torch.autograd.graph.saved_tensors_hooks``;
- the QLoRA paper's figures (65B on one 48 GB GPU, double quantization's 3 GB, >780 GB for full
  16-bit fine-tuning) and the published parameter counts of the shipped models;
- the command line and bad input.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from bnb_cpu import no_cpu_repacking
from hypothesis import given
from hypothesis import strategies as st
from strategies import blocksizes

from qlora_ref import quantize_4bit
from qlora_ref.cli import build_parser, main
from qlora_ref.memory import (
    LINEAR_NAMES,
    OPTIMIZERS,
    RESERVE_BYTES,
    FinetuneSetup,
    ModelShape,
    estimate_memory,
    fit_verdict,
    korthikanti_activation_bytes,
    largest_fits,
    load_models,
    model_shape,
    optimizer_state_nbytes,
    parse_size,
    published_parameters,
    quantized_tensor_nbytes,
    shape_from_config,
)
from qlora_ref.memory.activations import layer_activation_terms

ROOT = Path(__file__).resolve().parents[1]
GB, GiB = 10**9, 2**30

# A small model with awkward sizes: odd element counts (k_proj is 15 x 45), partial blocks, and
# a tensor (401 x 45) whose absmax spans more than one nested block of 256 at block size 32.
SMALL = ModelShape("small", hidden_size=45, intermediate_size=401, num_layers=2, num_heads=3, num_kv_heads=1,
                   vocab_size=50)


def _linear_weights(breakdown) -> int:
    return (breakdown.item_bytes("linear weights: 4-bit codes")
            + breakdown.item_bytes("linear weights: quantization constants"))


# -- weights: the exact storage of every 4-bit tensor ------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_weight_bytes_equal_oracle_states(blocksize, double_quant, quant_type):
    setup = FinetuneSetup(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, rank=4)
    breakdown = estimate_memory(SMALL, setup)
    rng = np.random.default_rng(0)
    codes = stored = 0
    for _ in range(SMALL.num_layers):
        for out_features, in_features in SMALL.linear_layers().values():
            W = rng.standard_normal((out_features, in_features)).astype(ml_dtypes.bfloat16)
            packed, state = quantize_4bit(W, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
            codes += packed.nbytes
            stored += state.nbytes  # codes + constants + code maps (Note: storage accounting)
    assert breakdown.item_bytes("linear weights: 4-bit codes") == codes
    assert _linear_weights(breakdown) == stored


@given(numel=st.integers(1, 70_000), blocksize=blocksizes, double_quant=st.booleans())
def test_quantized_tensor_nbytes_equals_quant_state(numel, blocksize, double_quant):
    x = np.linspace(-1.0, 1.0, numel, dtype=np.float32)
    packed, state = quantize_4bit(x, blocksize=blocksize, double_quant=double_quant)
    counted = quantized_tensor_nbytes(numel, blocksize=blocksize, double_quant=double_quant)
    assert counted["codes"] == packed.nbytes
    assert counted["codes"] + counted["constants"] == state.nbytes


def test_weight_and_adapter_bytes_equal_qlora_linear_buffers():
    torch = pytest.importorskip("torch")
    qlora_gpu = pytest.importorskip("qlora_gpu")
    if not hasattr(qlora_gpu, "QLoRALinear"):
        pytest.skip("qlora_gpu.QLoRALinear is missing")
    setup = FinetuneSetup(rank=4, blocksize=32, adapter_dtype="bfloat16")
    breakdown = estimate_memory(SMALL, setup)
    torch.manual_seed(0)
    base = adapters = 0
    for _ in range(SMALL.num_layers):
        for out_features, in_features in SMALL.linear_layers().values():
            layer = qlora_gpu.QLoRALinear(in_features, out_features, r=setup.rank, bias=False, blocksize=32,
                                          double_quant=True, adapter_dtype=torch.bfloat16)
            frozen = [p for p in layer.parameters() if not p.requires_grad]  # the uint8 codes (linear.py)
            base += sum(t.nbytes for t in [*layer.buffers(), *frozen])
            adapters += layer.lora_A.weight.nbytes + layer.lora_B.weight.nbytes
    assert _linear_weights(breakdown) == base
    assert breakdown.item_bytes("LoRA adapters A, B") == adapters


# -- a transformers model loaded in 4-bit by bitsandbytes --------------------------------------


def _tiny_configs():
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return {
        "llama": (transformers.LlamaConfig(**common), dict(mlp="gated", norm="rmsnorm", bias=())),
        "llama-tied": (transformers.LlamaConfig(**common, tie_word_embeddings=True),
                       dict(mlp="gated", norm="rmsnorm", bias=())),
        "qwen2": (transformers.Qwen2Config(**common, tie_word_embeddings=False),
                  dict(mlp="gated", norm="rmsnorm", bias=("q_proj", "k_proj", "v_proj"))),
    }


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Tiny bf16 checkpoints written once: {name: (folder, config, architecture)}."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = {}
    for name, (config, arch) in _tiny_configs().items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (folder, config, arch)
    return out


def _load_4bit(folder, *, attention="sdpa"):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization,
                                                              dtype=torch.bfloat16, device_map="cpu",
                                                              attn_implementation=attention)
    # On AVX512-BF16 CPUs an eval forward without grad would repack the frozen Linear4bit weights
    # in place (another layout and size, and an error for in_features not a multiple of the
    # blocksize): measure the layout every machine has.
    return no_cpu_repacking(model)


@pytest.mark.parametrize("name", ["llama", "llama-tied", "qwen2"])
def test_weight_bytes_equal_bitsandbytes_model(tiny_checkpoints, name):
    bnb = pytest.importorskip("bitsandbytes")
    folder, config, arch = tiny_checkpoints[name]
    model = _load_4bit(folder)
    quantized = other = 0
    blocksizes_seen = set()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            blocksizes_seen.add(qs.blocksize)
            # Every tensor a checkpoint stores for the layer. In memory bitsandbytes shares one
            # nested map among all layers; checkpoints (and the oracle) store it per tensor.
            quantized += module.weight.data.nbytes + qs.absmax.nbytes + qs.code.nbytes
            quantized += qs.state2.absmax.nbytes + qs.state2.code.nbytes + qs.offset.nbytes
    for p in model.parameters():
        if not isinstance(p, bnb.nn.Params4bit):
            other += p.nbytes
    (blocksize,) = blocksizes_seen
    shape = shape_from_config(name, config.to_dict(), arch)
    setup = FinetuneSetup(blocksize=blocksize, base_dtype="bfloat16", norm_dtype="bfloat16", rank=4)
    breakdown = estimate_memory(shape, setup)
    assert _linear_weights(breakdown) == quantized
    unquantized = [i for i in breakdown.items if i.category == "weights" and not i.name.startswith("linear")]
    assert sum(i.nbytes for i in unquantized) == other


# -- adapters, gradients and optimizer state ----------------------------------------------------


def _peft_model(folder, targets, *, rank=4, dropout=0.0, attention="sdpa"):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model = _load_4bit(folder, attention=attention)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=dropout)
    model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    for name, p in model.named_parameters():
        if "lora_" in name:  # the QLoRA recipe: adapters in bf16
            p.data = p.data.to(torch.bfloat16)
    return model


@pytest.mark.parametrize("targets", [LINEAR_NAMES, ("q_proj", "v_proj"), ("down_proj",)])
def test_adapter_and_gradient_bytes_equal_peft(tiny_checkpoints, targets):
    folder, config, arch = tiny_checkpoints["llama"]
    model = _peft_model(folder, targets)
    trainable = [p for p in model.parameters() if p.requires_grad]
    breakdown = estimate_memory(shape_from_config("llama", config.to_dict(), arch),
                                FinetuneSetup(target_modules=targets, rank=4))
    assert breakdown.trainable_parameters == sum(p.numel() for p in trainable)
    assert breakdown.item_bytes("LoRA adapters A, B") == sum(p.nbytes for p in trainable)
    ids = __import__("torch").randint(0, config.vocab_size, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert breakdown.item_bytes("gradients of trainable parameters") == sum(p.grad.nbytes for p in trainable)


@pytest.mark.parametrize("optimizer", ["adamw_torch", "sgd_momentum", "paged_adamw_32bit", "adamw_8bit",
                                       "paged_adamw_8bit", "paged_lion_8bit"])
def test_optimizer_bytes_equal_real_optimizers(optimizer):
    torch = pytest.importorskip("torch")
    real = {
        "adamw_torch": lambda ps: torch.optim.AdamW(ps),
        "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    }
    if optimizer not in real:
        bnb = pytest.importorskip("bitsandbytes")
        real.update(paged_adamw_32bit=bnb.optim.PagedAdamW32bit, adamw_8bit=bnb.optim.AdamW8bit,
                    paged_adamw_8bit=bnb.optim.PagedAdamW8bit, paged_lion_8bit=bnb.optim.PagedLion8bit)
    # Rank 16 on SMALL: some adapter tensors are under bitsandbytes' 4096-element 8-bit threshold
    # (A of q_proj: 16 x 45), some above it (A of down_proj: 16 x 401).
    setup = FinetuneSetup(rank=16, optimizer=optimizer)
    breakdown = estimate_memory(SMALL, setup)
    params = []
    for _ in range(SMALL.num_layers):
        for out_features, in_features in SMALL.linear_layers().values():
            params += [torch.nn.Parameter(torch.randn(16, in_features, dtype=torch.bfloat16)),
                       torch.nn.Parameter(torch.randn(out_features, 16, dtype=torch.bfloat16))]
    opt = real[optimizer](params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    storages = {}
    for state in opt.state.values():
        for key, t in state.items():
            # Step counters are not modeled (torch keeps a 0-d float32 per tensor).
            if torch.is_tensor(t) and key != "step":
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    assert breakdown.item_bytes(f"optimizer state ({optimizer})") == sum(storages.values())
    assert any(i.paged for i in breakdown.items) == OPTIMIZERS[optimizer][2]


def test_optimizer_state_nbytes_small_tensors_fall_back_to_float32():
    assert optimizer_state_nbytes(4095, "bfloat16", "adamw_8bit") == 2 * 4 * 4095
    assert optimizer_state_nbytes(4096, "bfloat16", "adamw_8bit") == 2 * (4096 + 4 * 16)


# -- activations: what autograd really saves ---------------------------------------------------


def _saved_activation_bytes(model, batch_size, seq_len, vocab_size):
    """Bytes of distinct storages autograd saves in one forward, plus the logits the output holds."""
    torch = pytest.importorskip("torch")
    known = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    storages = {}

    def pack(t):
        # 0-d bookkeeping scalars (the loss's total weight) are not modeled.
        if t.dim() and t.data_ptr() not in known:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    storages[out.logits.untyped_storage().data_ptr()] = out.logits.untyped_storage().nbytes()
    return sum(storages.values())


def _expected_saved_bytes(breakdown, shape, batch_size, seq_len):
    """What the calculator says autograd saves: the kept activations (not the token batch, nor the
    embedding output, a leaf the graph holds without saving it), plus what the loss saves (labels,
    float32 log-softmax) and the bf16 logits the output holds."""
    leave_out = ("token batch", "embedding output")
    kept = sum(i.nbytes for i in breakdown.items if i.category == "activations" and not i.name.startswith(leave_out))
    return kept + batch_size * seq_len * (shape.vocab_size * (2 + 4) + 8)


@pytest.mark.parametrize("targets, attention, dropout, checkpointing", [
    (LINEAR_NAMES, "sdpa", False, False),
    (("q_proj", "v_proj"), "sdpa", False, False),
    (("down_proj",), "sdpa", False, False),
    (("q_proj", "v_proj", "o_proj"), "eager", False, False),
    (("q_proj", "v_proj", "o_proj", "down_proj"), "sdpa", True, False),
    (LINEAR_NAMES, "sdpa", False, True),
])
def test_activation_bytes_equal_autograd_saved_tensors(tiny_checkpoints, targets, attention, dropout, checkpointing):
    folder, config, arch = tiny_checkpoints["llama"]
    model = _peft_model(folder, targets, dropout=0.1 if dropout else 0.0, attention=attention)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # as prepare_model_for_kbit_training does
    batch_size, seq_len = 2, 24  # seq_len differs from head_dim (16), so no shape is ambiguous
    measured = _saved_activation_bytes(model, batch_size, seq_len, config.vocab_size)
    shape = shape_from_config("llama", config.to_dict(), arch)
    setup = FinetuneSetup(target_modules=targets, rank=4, batch_size=batch_size, seq_len=seq_len,
                          gradient_checkpointing=checkpointing, attention=attention, lora_dropout=dropout)
    breakdown = estimate_memory(shape, setup)
    expected = _expected_saved_bytes(breakdown, shape, batch_size, seq_len)
    if dropout:
        # CPU dropout keeps its mask in the input dtype (2 bytes); the model counts CUDA's fused
        # dropout, whose mask is bool (1 byte): one extra byte per masked element here.
        layers = shape.linear_layers()
        masked = sum(layers[n][1] for n in targets) * shape.num_layers * batch_size * seq_len
        expected += masked
    if checkpointing:
        # The checkpointed layers hold the RoPE tables and position ids by reference, not through
        # saved-tensor hooks.
        expected -= breakdown.item_bytes("RoPE cos/sin, position ids")
    assert measured == expected


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_full_finetune_activation_bytes_equal_autograd_saved_tensors(attention):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, arch = _tiny_configs()["llama"]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention).to(torch.bfloat16)
    model.train()  # every parameter trains: linear inputs, normalized norm inputs, head input, ids are kept
    measured = _saved_activation_bytes(model, 2, 24, config.vocab_size)
    setup = FinetuneSetup(quant_type=None, full_finetune=True, batch_size=2, seq_len=24, gradient_checkpointing=False,
                          attention=attention, norm_dtype="bfloat16")
    shape = shape_from_config("llama", config.to_dict(), arch)
    assert measured == _expected_saved_bytes(estimate_memory(shape, setup), shape, 2, 24)


def test_activations_against_korthikanti_formula():
    # A GPT layer (LayerNorm, plain MLP with i = 4h, multi-head attention), fully fine-tuned:
    # Korthikanti et al. count 34 s b h + 5 a s^2 b bytes. This model counts 36 h per token plus
    # the norm statistics and SDPA's log-sum-exp: +4 h for the two float32 norm inputs, -2 h for
    # the two dropout masks GPT has and LLaMA-style models do not, and no s^2 term with SDPA.
    h, a, s = 1024, 16, 1024
    gpt = ModelShape("gpt", hidden_size=h, intermediate_size=4 * h, num_layers=1, num_heads=a, num_kv_heads=a,
                     vocab_size=50257, mlp="plain", norm="layernorm")
    setup = FinetuneSetup(quant_type=None, full_finetune=True, seq_len=s, gradient_checkpointing=False)
    per_token = sum(nbytes for _, nbytes in layer_activation_terms(gpt, setup))
    norm_stats = 2 * 2 * 4  # two LayerNorms, mean and rstd in float32
    assert per_token == (34 + 4 - 2) * h + norm_stats + 4 * a
    assert korthikanti_activation_bytes(gpt, batch_size=1, seq_len=s) == 34 * s * h + 5 * a * s * s
    # Eager attention keeps the s^2 scores: 6 bytes each (float32 softmax and its bf16 copy)
    # where Korthikanti counts 5 (16-bit softmax, its dropout mask and dropout output).
    eager = sum(nbytes for _, nbytes in layer_activation_terms(gpt, FinetuneSetup(
        quant_type=None, full_finetune=True, seq_len=s, attention="eager")))
    assert eager - per_token == a * s * (4 + 2) - 4 * a


# -- published figures -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(load_models()))
def test_shipped_shapes_reproduce_published_parameter_counts(name):
    assert model_shape(name).num_parameters() == published_parameters(name)


def test_qlora_paper_65b_fits_one_48gb_gpu():
    # QLoRA (Dettmers et al. 2023), abstract and section 1: LLaMA-65B fine-tuned on a single 48 GB
    # GPU, "from >780GB of GPU memory to <48GB"; recipe (section 5 and the repository's
    # scripts): NF4, double quantization, LoRA r=64 on all linear layers, bf16 adapters, paged
    # 32-bit AdamW, gradient checkpointing; the paper's memory figure uses batch 1, 512 tokens.
    llama65 = model_shape("llama-65b")
    qlora = estimate_memory(llama65, FinetuneSetup(batch_size=1, seq_len=512))
    # The calculator's peak is about 44.6 GB (41.6 GiB): it fits, with about 3.4 GB to spare
    # against 48e9 bytes (6.4 GiB against a 48 GiB card). The difference is what the
    # calculator leaves out (CUDA context, cuBLAS workspaces, allocator fragmentation) and
    # room for longer sequences; the paged optimizer state (6.4 GB) can also be evicted to CPU.
    assert 44 * GB < qlora.total_bytes < 48 * GB
    assert qlora.resident_bytes < qlora.total_bytes - 6 * GB
    # ">780GB": 16-bit weights and gradients plus two float32 Adam states, 12 bytes a parameter.
    full = estimate_memory(llama65, FinetuneSetup(quant_type=None, full_finetune=True, optimizer="adamw_32bit"))
    states = sum(full.category_bytes(c) for c in ("weights", "gradients", "optimizer"))
    assert 780 * GB < states < 790 * GB
    # Double quantization "saves about 0.37 bits per parameter (approximately 3 GB for a 65B model)".
    without = estimate_memory(llama65, FinetuneSetup(double_quant=False))
    saved = _linear_weights(without) - _linear_weights(qlora)
    assert round(saved / GB) == 3
    assert abs(8 * saved / qlora.quantized_parameters - 0.373) < 0.001


# -- command line ------------------------------------------------------------------------------


def test_cli_table_and_json(capsys):
    assert main(["memory", "--model", "llama-2-7b", "--seq-len", "1024"]) == 0
    table = capsys.readouterr().out
    assert "llama-2-7b" in table and "peak (" in table and "LoRA adapters A, B" in table
    assert main(["memory", "--model", "llama-2-7b", "--seq-len", "1024", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = estimate_memory(model_shape("llama-2-7b"), FinetuneSetup(seq_len=1024))
    assert data["total_bytes"] == expected.total_bytes
    assert data["trainable_parameters"] == expected.trainable_parameters


def test_cli_shape_flags_and_overrides(capsys):
    flags = ["--hidden-size", "45", "--intermediate-size", "401", "--layers", "2", "--heads", "3",
             "--kv-heads", "1", "--vocab-size", "50", "--rank", "4", "--quant", "fp4", "--no-double-quant",
             "--optimizer", "adamw_8bit", "--no-checkpointing", "--json"]
    assert main(["memory", *flags]) == 0
    data = json.loads(capsys.readouterr().out)
    setup = FinetuneSetup(quant_type="fp4", double_quant=False, rank=4, optimizer="adamw_8bit",
                          gradient_checkpointing=False)
    assert data["total_bytes"] == estimate_memory(SMALL, setup).total_bytes
    assert main(["memory", "--model", "llama-2-7b", "--vocab-size", "32001", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["vocab_size"] == 32001
    assert main(["memory", "--list-models"]) == 0
    assert "llama-65b" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama-2-7b", "--rank", "0"], "--rank must be at least 1"),
    (["--model", "lama-2-7b"], "did you mean llama-2-7b"),
    (["--model", "llama-2-7b", "--hidden-size", "-4096"], "hidden_size must be positive"),
    (["--hidden-size", "64"], "missing --intermediate-size"),
    (["--model", "phi-2", "--targets", "q_proj,gate_proj"], "no linear layers ['gate_proj']"),
    (["--model", "llama-2-7b", "--targets", "q,v"], "unknown target modules"),
    (["--model", "llama-2-7b", "--full-finetune"], "cannot stay 4-bit: add --quant none"),
    (["--model", "llama-2-7b", "--batch-size", "-1"], "--batch-size must be at least 1"),
    (["--model", "llama-2-7b", "--gpu", "24XB"], "--gpu '24XB' is not a size"),
    (["--model", "llama-2-7b", "--gpu", "1GB", "--reserve", "2GB"], "leaves nothing of --gpu"),
    (["--model", "llama-2-7b", "--gpus", "0"], "--gpus must be at least 1"),
])
def test_cli_bad_input(capsys, argv, message):
    assert main(["memory", *argv]) == 2
    assert message in capsys.readouterr().err


# -- bad input to the API ----------------------------------------------------------------------


@pytest.mark.parametrize("changes, error, message", [
    (dict(hidden_size=-1), ValueError, "hidden_size must be positive"),
    (dict(num_layers=0), ValueError, "num_layers must be positive"),
    (dict(vocab_size=3.5), TypeError, "vocab_size must be an int"),
    (dict(num_kv_heads=2), ValueError, "not a multiple of num_kv_heads"),
    (dict(mlp="moe"), ValueError, "mlp must be"),
    (dict(bias=("fc9",)), ValueError, "unknown linear layers"),
])
def test_model_shape_rejects_bad_values(changes, error, message):
    fields = dict(name="bad", hidden_size=45, intermediate_size=401, num_layers=2, num_heads=3, num_kv_heads=1,
                  vocab_size=50)
    with pytest.raises(error, match=message):
        ModelShape(**{**fields, **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(rank=0), "rank must be positive"),
    (dict(seq_len=-5), "seq_len must be positive"),
    (dict(blocksize=100), "blocksize 100 is not allowed"),
    (dict(quant_type="nf3"), "quant_type must be one of"),
    (dict(optimizer="adam9"), "unknown optimizer"),
    (dict(adapter_dtype="float64"), "adapter_dtype must be one of"),
    (dict(target_modules=()), "nothing would train"),
    (dict(full_finetune=True), "cannot stay 4-bit"),
])
def test_finetune_setup_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        FinetuneSetup(**changes)


def test_estimate_memory_rejects_wrong_types():
    with pytest.raises(TypeError, match="ModelShape"):
        estimate_memory("llama-2-7b")
    with pytest.raises(ValueError, match="unknown model"):
        model_shape("gpt-5")


# -- will it fit -------------------------------------------------------------------------------


def test_cli_fit_verdicts_for_70b(capsys):
    assert main(["memory", "--model", "llama-2-70b", "--gpu", "48GB"]) == 0
    out = capsys.readouterr().out
    assert "Verdict: FITS on 48.00 GiB" in out and "Largest micro-batch that fits" in out
    assert main(["memory", "--model", "llama-2-70b", "--gpu", "24GB"]) == 0
    assert "Verdict: DOES NOT FIT on 24.00 GiB" in capsys.readouterr().out
    assert main(["memory", "--model", "llama-2-70b", "--gpus", "2", "--gpu", "24GB", "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)["fit"]
    assert fit["fits"] is True and isinstance(fit["margin_bytes"], int) and fit["margin_bytes"] > 0
    assert fit["usable_bytes"] == 23 * 2**30 and fit["reserve_bytes"] == RESERVE_BYTES
    best = [r for r in fit["largest_fits"] if r["gradient_checkpointing"] and r["seq_len"] == 512][0]
    assert isinstance(best["batch_size"], int) and best["batch_size"] >= 1


def test_fit_sweep_is_the_largest_batch_that_fits():
    model, gpu = model_shape("llama-2-7b"), 24 * 2**30
    for row in largest_fits(model, FinetuneSetup(), gpu, seq_lens=(1024, 4096)):
        setup = FinetuneSetup(seq_len=row["seq_len"], gradient_checkpointing=row["gradient_checkpointing"])
        if row["batch_size"]:
            assert fit_verdict(model, replace(setup, batch_size=row["batch_size"]), gpu)["fits"]
        nxt = {0: 1}.get(row["batch_size"], 2 * row["batch_size"])
        assert not fit_verdict(model, replace(setup, batch_size=nxt), gpu)["fits"]


def test_fsdp_shards_persistent_state_and_offload_moves_it_to_cpu():
    model = model_shape("llama-2-70b")
    one = estimate_memory(model, FinetuneSetup())
    two = estimate_memory(model, FinetuneSetup(num_gpus=2))
    off = estimate_memory(model, FinetuneSetup(num_gpus=2, cpu_offload=True))
    codes = one.item_bytes("linear weights: 4-bit codes")
    assert two.item_bytes("linear weights: 4-bit codes") == -(-codes // 2)
    assert off.cpu_bytes > codes // 2 and off.resident_bytes < two.resident_bytes < one.resident_bytes


def test_peak_is_the_fullest_phase_not_the_sum():
    b = estimate_memory(model_shape("llama-2-7b"), FinetuneSetup(seq_len=2048))
    per_phase = b.phase_bytes()
    assert b.total_bytes == max(per_phase.values()) < sum(i.nbytes for i in b.items)
    assert b.peak_phase in per_phase


@pytest.mark.parametrize("text, nbytes", [("24GB", 24 * 2**30), ("80 GiB", 80 * 2**30), ("512MiB", 512 * 2**20),
                                          ("1.5GiB", 3 * 2**29), ("1000", 1000), ("2MB", 2 * 10**6)])
def test_parse_size(text, nbytes):
    assert parse_size(text) == nbytes


def test_help_shows_real_defaults_and_helps_every_option():
    parser = build_parser()
    memory_parser = parser._subparsers._group_actions[0].choices["memory"]
    text = " ".join(memory_parser.format_help().split())  # undo line wrapping
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 64)" in text and "(default: paged_adamw_32bit)" in text
    for action in memory_parser._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_json_piped_to_a_closed_reader_ends_quietly():
    proc = subprocess.Popen([sys.executable, "-c", "from qlora_ref.cli import main; raise SystemExit(main())",
                             "memory", "--model", "llama-2-70b", "--gpu", "24GB", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes away before the command writes, as `| head -0` would
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr


def test_vectors_out_existing_file_is_a_cli_error(tmp_path, capsys):
    existing = tmp_path / "taken"
    existing.write_text("")
    assert main(["vectors", "--out", str(existing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlora-ref vectors: error:") and str(existing) in err
