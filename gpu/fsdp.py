"""QLoRA under PyTorch FSDP2 (``fully_shard``): what each rank holds, and full checkpoints.

``QLoRALinear`` keeps its packed codes and 8-bit absmax codes as frozen uint8 parameters
(``qlora_gpu.linear``, Note: what FSDP shards), so ``torch.distributed.fsdp.fully_shard`` shards a
model made by ``replace_linear_with_qlora`` as it is, with the gloo backend on CPU or NCCL on
GPUs. This module measures what a rank holds and gathers a full checkpoint. No oracle pair:
sharding moves bytes and never changes them; ``tests/test_fsdp.py`` compares a two-process run
with the single-process one bit for bit.

Note: sharding a QLoRA model
    ``fully_shard(layer)`` for each decoder layer, then ``fully_shard(model)`` for the rest
    (embeddings, final norm, head). Each parameter of a group is cut along dim 0 into
    ``world_size`` chunks (the last ones padded) and rank ``k`` keeps chunk ``k``: a packed
    weight of ``(n_bytes, 1)`` becomes ``(n_bytes / world_size, 1)`` per rank, and so do the
    absmax codes and the adapters. The float32 constants are buffers, whole on every rank.

    - Forward: just before a group runs, FSDP all-gathers its chunks into whole tensors; the
      layer decodes its 4-bit weight from them exactly as on one process, so a rank that sees
      the same input computes the same bits. After the group's forward the whole tensors are
      freed (``reshard_after_forward=True``).
    - Backward: the group is gathered again; only the adapters get gradients, which FSDP
      reduce-scatters (the mean over ranks), so each rank keeps the gradient of its chunk and
      its optimizer updates that chunk: optimizer state is sharded too.
    - Mixed precision: ``MixedPrecisionPolicy(param_dtype=torch.bfloat16,
      reduce_dtype=torch.float32)`` gathers floating parameters in bfloat16 (the float32 chunks
      stay the optimizer's master copy) and reduces gradients in float32; integer parameters,
      the 4-bit codes, are gathered as stored.
    - ``CPUOffloadPolicy`` keeps the chunks (and gradients) in CPU memory and copies them to the
      device before the all-gather.

Public API
----------
``RankBytes``: bytes one rank holds, by kind (``packed``, ``absmax_codes``, ``constants``,
    ``adapters``, ``other``); ``total``.
``rank_nbytes(model)`` -> ``RankBytes``, measured from the local shards.
``full_state_dict(model)`` -> ``{key: Tensor}`` on rank 0 (``{}`` elsewhere): the whole model
    in bitsandbytes' key layout for the 4-bit layers, adapters under ``<layer>.lora_A.weight``.
``load_full_state_dict(model, state_dict)``: the reverse, onto a sharded model.
Sharded checkpoints need nothing more: ``model.state_dict()`` holds DTensors, which
``torch.distributed.checkpoint.save`` / ``load`` write and read in place.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from qlora_gpu.linear import QLoRALinear

__all__ = ["RankBytes", "rank_nbytes", "full_state_dict", "load_full_state_dict"]


@dataclass(frozen=True)
class RankBytes:
    """Bytes of a model's tensors held by one rank (its local shards), by kind.

    Attributes
    ----------
    packed : int
        Packed 4-bit codes of every ``QLoRALinear`` (``weight``).
    absmax_codes : int
        Their 8-bit absmax codes (double quantization; 0 without it).
    constants : int
        The float32 buffers of the 4-bit layers (code maps, nested absmax, offsets; the float32
        absmax without double quantization): whole on every rank.
    adapters : int
        ``lora_A`` and ``lora_B`` weights.
    other : int
        Every other parameter and buffer (embeddings, norms, biases, rotary tables).
    """

    packed: int
    absmax_codes: int
    constants: int
    adapters: int
    other: int

    @property
    def total(self) -> int:
        """Sum of all kinds."""
        return sum(getattr(self, f.name) for f in fields(self))


def _local_nbytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def rank_nbytes(model: nn.Module) -> RankBytes:
    """Measure the bytes of ``model``'s parameters and buffers that this rank holds.

    Works on a sharded model (each ``DTensor`` counts its local shard) and on a plain one (the
    whole tensors). Gradients and optimizer state are not counted.

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    RankBytes

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``.

    Examples
    --------
    >>> layer = QLoRALinear(128, 64, r=4)
    >>> b = rank_nbytes(torch.nn.Sequential(layer))
    >>> b.packed, b.absmax_codes, b.adapters  # 8192 weights: 4096 bytes, 128 blocks of 64
    (4096, 128, 3072)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    counted: set = set()
    kinds = dict(packed=0, absmax_codes=0, constants=0, adapters=0, other=0)

    def add(kind, t):
        if t is not None and id(t) not in counted:
            counted.add(id(t))
            kinds[kind] += _local_nbytes(t)

    for m in model.modules():
        if isinstance(m, QLoRALinear):
            add("packed", m.weight)
            if m.absmax.dtype == torch.uint8:
                add("absmax_codes", m.absmax)
            for name, b in m.named_buffers(recurse=False):
                add("constants", b)
            add("adapters", m.lora_A.weight)
            add("adapters", m.lora_B.weight)
    for t in [*model.parameters(), *model.buffers()]:
        add("other", t)
    return RankBytes(**kinds)


def full_state_dict(model: nn.Module) -> dict:
    """Gather a (sharded) model's whole state dict onto rank 0, in CPU memory.

    The keys of each ``QLoRALinear`` are bitsandbytes' (``weight``, ``weight.absmax``, ...,
    ``weight.quant_state.bitsandbytes__nf4``) followed by ``lora_A.weight`` and
    ``lora_B.weight``; other modules keep theirs. Every rank must call it: each sharded tensor
    is all-gathered in turn, and only rank 0 keeps it.

    Parameters
    ----------
    model : nn.Module
        Sharded by ``fully_shard`` or not.

    Returns
    -------
    dict of str to Tensor
        On rank 0 (or without a process group) the whole state dict; ``{}`` on other ranks.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``.

    Notes
    -----
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` cannot be used: it finds
    each key's tensor by attribute lookup, and bitsandbytes' keys (``weight.absmax``) are not
    attribute paths. ``model.state_dict()`` itself is the sharded state dict (DTensors) that
    ``torch.distributed.checkpoint.save`` and ``load`` take.

    Examples
    --------
    >>> sd = full_state_dict(torch.nn.Sequential(QLoRALinear(64, 32, r=2)))
    >>> list(sd)[:3]
    ['0.weight', '0.bias', '0.weight.absmax']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    keep = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    out = {}
    for key, t in model.state_dict().items():
        whole = t.full_tensor() if isinstance(t, DTensor) else t  # every rank takes part in the gather
        if keep:
            out[key] = whole.detach().cpu()
    return out


def load_full_state_dict(model: nn.Module, state_dict: dict, *, strict: bool = True):
    """Load a whole state dict (every rank holds it, e.g. read from one file) into a sharded model.

    Each entry whose model tensor is a ``DTensor`` is cut into the same shards
    (``distribute_tensor`` with the model tensor's mesh and placements; rank 0's copy is
    scattered); then ``model.load_state_dict`` copies every entry in place, which keeps the
    parameters FSDP manages (``QLoRALinear`` loads its 4-bit state in place when the layout
    matches, and refuses a different layout when sharded).

    Parameters
    ----------
    model : nn.Module
        Sharded by ``fully_shard`` or not.
    state_dict : dict of str to Tensor
        Whole tensors, keys as ``model.state_dict()`` (bitsandbytes' layout for 4-bit layers).
    strict : bool
        As ``nn.Module.load_state_dict``.

    Returns
    -------
    The ``(missing_keys, unexpected_keys)`` result of ``load_state_dict``.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module`` or ``state_dict`` not a dict.
    RuntimeError
        As ``load_state_dict`` (strict mode, damaged 4-bit entries, shapes that differ).

    Examples
    --------
    >>> layer = QLoRALinear(64, 32, r=2)
    >>> other = QLoRALinear(64, 32, r=2)
    >>> load_full_state_dict(other, layer.state_dict()).missing_keys
    []
    >>> bool(torch.equal(other.lora_A.weight, layer.lora_A.weight))
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    local = model.state_dict()
    converted = {}
    for key, t in state_dict.items():
        target = local.get(key)
        if isinstance(target, DTensor) and not isinstance(t, DTensor):
            if tuple(t.shape) != tuple(target.shape):
                raise RuntimeError(f"size mismatch for {key}: the state dict's is {tuple(t.shape)}, "
                                   f"the model's {tuple(target.shape)}")
            t = distribute_tensor(t.to(target.device, target.dtype), target.device_mesh, target.placements)
        converted[key] = t
    return model.load_state_dict(converted, strict=strict)
