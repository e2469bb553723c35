"""``QLoRALinear``: a linear layer with a frozen 4-bit base and trainable LoRA adapters.

The layer people train with. Its forward and backward are ``qlora_gpu.qlora.qlora_linear``
(tested against the oracle's ``qlora_forward`` / ``qlora_backward``); its state dict uses
bitsandbytes' key layout for the base (``qlora_gpu.bnb_format``) and PEFT's names for the
adapters, so a layer of a transformers 4-bit checkpoint loads into it and saves back
identically.

Public API
----------
``QLoRALinear(in_features, out_features, r=8, alpha=16, *, bias=True, quant_type="nf4",
blocksize=64, double_quant=True, rslora=False, dropout=0.0, compute_dtype=torch.bfloat16,
adapter_dtype=torch.float32, dtype=torch.float32, backend="auto", device=None)``
    A fresh layer: the base weight is drawn as ``nn.Linear`` draws it (in ``dtype``), then
    quantized. ``quant_type`` is ``"nf4"``, ``"fp4"`` or ``"int4"``.
``QLoRALinear.from_linear(linear, r=8, alpha=16, **options)``
    Quantize an existing ``nn.Linear`` (its weight and bias are copied, never shared).
``QLoRALinear.from_bnb_state_dict(d, r=8, alpha=16, **options)``
    Build one from a layer's bitsandbytes entries (``weight``, ``weight.absmax``, ...,
    ``bias``) and fresh adapters.
``layer(x)``: ``y = x W^T + bias + s B(A(dropout(x)))`` with ``s = alpha / r`` (or
    ``alpha / sqrt(r)`` with ``rslora``); ``layer.merged_weight(dtype=torch.float32)``:
    the dense ``W + s B A``; ``layer.quant_state`` and ``layer.weight`` (packed uint8).
    A layer loaded from entries whose ``weight`` has another storage dtype over the same bytes
    (bitsandbytes' ``quant_storage``, e.g. bfloat16) still holds uint8 codes, and its state dict
    writes ``weight`` back in that dtype, so the saved entries are the loaded ones byte for byte
    (under FSDP, where ``weight`` is a shard, it is written as uint8).
State dict keys: ``weight``, ``bias``, ``weight.absmax``, ``weight.quant_map``,
    ``weight.nested_absmax``, ``weight.nested_quant_map``,
    ``weight.quant_state.bitsandbytes__nf4`` (bitsandbytes' order), ``lora_A.weight`` ``(r, in)``,
    ``lora_B.weight`` ``(out, r)``.

Note: what FSDP shards
    The packed codes ``weight`` and, with double quantization, the 8-bit absmax codes
    ``absmax`` are frozen uint8 ``nn.Parameter``s (``requires_grad=False``), as bitsandbytes'
    ``Params4bit`` is a parameter: PyTorch FSDP2 (``fully_shard``) shards every parameter of a
    module along dim 0 and all-gathers it before the forward and the backward, and its mixed
    precision policy never casts an integer parameter, so the gathered bytes are the stored
    bytes. The float32 constants are buffers, replicated on every rank and never cast: the two
    code maps, the nested absmax (one float per 16384 weights at block 64), the offset and,
    without double quantization, the float32 absmax (4 bytes per block). ``qlora_gpu.fsdp``
    shards whole models this way.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from qlora_gpu.bnb_format import ABSMAX, from_bnb_state_dict, to_bnb_state_dict
from qlora_gpu.lora import lora_scaling
from qlora_gpu.qlora import qlora_linear
from qlora_gpu.quantize import dequantize_4bit, quantize_4bit
from qlora_gpu.state import NestedAbsmax, QuantState, torch_dtype

__all__ = ["QLoRALinear"]

# Tensors that hold the 4-bit state: moved by .to(device), never converted by .to(dtype). The
# uint8 ones are frozen parameters (Note: what FSDP shards), the float32 ones buffers.
_STATE_TENSORS = ("weight", "quant_map", "absmax", "nested_absmax", "nested_quant_map", "nested_offset")


class QLoRALinear(nn.Module):
    """A frozen 4-bit base weight plus a trainable low-rank adapter (QLoRA section 3).

    Parameters
    ----------
    in_features, out_features : int
    r : int
        Adapter rank, ``1 <= r <= min(in_features, out_features)``.
    alpha : float
        ``lora_alpha``; the scaling is ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
    bias : bool
        Whether the base layer has a (frozen) bias.
    quant_type : {"nf4", "fp4", "int4"}
    blocksize : int
    double_quant : bool
        bitsandbytes' double quantization of the absmax (default on, as in QLoRA).
    rslora : bool
    dropout : float in [0, 1)
        Dropout on the adapter's input, in training mode only.
    compute_dtype : torch.dtype
        The base weight is decoded to it and ``x W^T`` runs in it.
    adapter_dtype : torch.dtype
        dtype of ``lora_A.weight`` and ``lora_B.weight`` and of the adapter's arithmetic.
    dtype : torch.dtype
        dtype of the base weight before quantization (recorded in the state) and of the bias.
    backend : {"auto", "torch", "triton"}
    device : torch.device, optional

    Examples
    --------
    >>> torch.manual_seed(0) is not None
    True
    >>> layer = QLoRALinear(64, 32, r=4, alpha=8, compute_dtype=torch.float32)
    >>> layer(torch.randn(5, 64)).shape, layer.scaling
    (torch.Size([5, 32]), 2.0)
    >>> [name for name, p in layer.named_parameters() if p.requires_grad]
    ['lora_A.weight', 'lora_B.weight']
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16, *, bias: bool = True,
                 quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True, rslora: bool = False,
                 dropout: float = 0.0, compute_dtype=torch.bfloat16, adapter_dtype=torch.float32,
                 dtype=torch.float32, backend: str = "auto", device=None, _base: nn.Linear | None = None,
                 _quantized: tuple | None = None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("r", r)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if r > min(in_features, out_features):
            raise ValueError(f"rank r = {r} is larger than min(in, out) = {min(in_features, out_features)}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.alpha, self.rslora, self.dropout = alpha, rslora, float(dropout)
        self.scaling = lora_scaling(alpha, r, rslora=rslora)
        self.compute_dtype = torch_dtype(compute_dtype)
        self.backend = backend
        if _quantized is not None:  # (packed, state, bias[, storage dtype]) from a checkpoint
            self._set_base(*_quantized)
        else:
            base = _base if _base is not None else nn.Linear(in_features, out_features, bias=bias, device=device,
                                                             dtype=dtype)
            with torch.no_grad():
                packed, state = quantize_4bit(base.weight.detach(), blocksize=blocksize, quant_type=quant_type,
                                              double_quant=double_quant)
            self._set_base(packed, state, None if base.bias is None else base.bias.detach().clone())
        device = self.weight.device
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=adapter_dtype)
        self.reset_lora_parameters()

    # -- the frozen base ---------------------------------------------------------------------

    def _set_base(self, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None,
                  storage: torch.dtype = torch.uint8) -> None:
        """Store the packed weight and its state (Note: what FSDP shards); they move with ``.to()``.

        ``storage``: the dtype the state dict writes ``weight`` in (the loaded checkpoint's).
        """
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"the 4-bit weight has shape {state.shape}, expected ({self.out_features}, {self.in_features})")
        for name in _STATE_TENSORS:  # a name moves between parameter and buffer with the layout
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
        self.register_parameter("weight", nn.Parameter(packed.reshape(-1, 1), requires_grad=False))
        self.register_buffer("quant_map", state.codebook, persistent=False)
        nested = state.nested
        if nested is None:
            self.register_buffer("absmax", state.absmax, persistent=False)
        else:
            self.register_parameter("absmax", nn.Parameter(nested.codes, requires_grad=False))
        self.register_buffer("nested_absmax", None if nested is None else nested.absmax, persistent=False)
        self.register_buffer("nested_quant_map", None if nested is None else nested.codebook, persistent=False)
        self.register_buffer("nested_offset", None if nested is None else nested.offset, persistent=False)
        self._meta = dict(dtype=state.dtype, blocksize=state.blocksize, quant_type=state.quant_type,
                          nested_blocksize=None if nested is None else nested.blocksize, storage=storage)
        if "bias" in self.__dict__:  # a plain attribute would block register_parameter
            del self.__dict__["bias"]
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) must move the 4-bit state, never convert it: converting the float32
        # absmax or code maps to bf16 would silently change every decoded weight.
        saved = {name: self._buffers[name] for name in _STATE_TENSORS if self._buffers.get(name) is not None}
        for name in saved:
            self._buffers[name] = None
        super()._apply(fn, recurse)
        for name, t in saved.items():
            moved = fn(t)
            self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    @property
    def quant_state(self) -> QuantState:
        """The base weight's ``QuantState``, built over the current buffers (no copies)."""
        m = self._meta
        common = dict(shape=(self.out_features, self.in_features), dtype=m["dtype"], blocksize=m["blocksize"],
                      quant_type=m["quant_type"], codebook=self.quant_map)
        if m["nested_blocksize"] is None:
            return QuantState(**common, absmax=self.absmax)
        return QuantState(**common, nested=NestedAbsmax(codes=self.absmax, absmax=self.nested_absmax,
                                                        codebook=self.nested_quant_map, offset=self.nested_offset,
                                                        blocksize=m["nested_blocksize"]))

    @property
    def quant_type(self) -> str:
        return self._meta["quant_type"]

    def reset_lora_parameters(self) -> None:
        """PEFT's initialisation: ``A`` Kaiming-uniform with ``a = sqrt(5)``, ``B`` zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # -- construction from other layers ------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16, **options) -> "QLoRALinear":
        """Quantize ``linear`` into a new QLoRA layer (weight and bias copied, not shared).

        ``options`` are the keyword arguments of ``QLoRALinear`` (``bias`` and ``dtype``
        come from ``linear``).

        Raises
        ------
        TypeError
            If ``linear`` is not an ``nn.Linear``.

        Examples
        --------
        >>> linear = nn.Linear(64, 16)
        >>> layer = QLoRALinear.from_linear(linear, r=2, quant_type="fp4", double_quant=False)
        >>> layer.quant_state.quant_type, layer.quant_state.double_quant, layer.bias.requires_grad
        ('fp4', False, False)
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        options.pop("bias", None)
        options.pop("dtype", None)
        return cls(linear.in_features, linear.out_features, r, alpha, bias=linear.bias is not None,
                   dtype=linear.weight.dtype, _base=linear, **options)

    @classmethod
    def from_bnb_state_dict(cls, d, r: int = 8, alpha: float = 16, **options) -> "QLoRALinear":
        """Build a layer from one layer's bitsandbytes state-dict entries (keys relative to it).

        The base (and ``bias`` if present) come from ``d``; adapters are fresh unless ``d``
        holds ``lora_A.weight`` and ``lora_B.weight``.

        Examples
        --------
        >>> layer = QLoRALinear(64, 16, r=2)
        >>> again = QLoRALinear.from_bnb_state_dict(layer.state_dict(), r=2)
        >>> bool(torch.equal(again.weight, layer.weight))
        True
        """
        packed, state = from_bnb_state_dict(d)
        if len(state.shape) != 2:
            raise ValueError(f"a linear layer's weight is 2-D (out, in); the quant_state JSON gives shape "
                             f"{state.shape}")
        out_features, in_features = state.shape
        for k in ("quant_type", "blocksize", "double_quant", "dtype", "bias", "_base", "_quantized"):
            options.pop(k, None)
        bias = d.get("bias")
        # Exact shapes, as load_state_dict requires: copy_ would broadcast (1, in) over (r, in).
        expected = {"bias": (out_features,), "lora_A.weight": (r, in_features), "lora_B.weight": (out_features, r)}
        for key, shape in expected.items():
            if key in d:
                if not isinstance(d[key], torch.Tensor):
                    raise TypeError(f"{key!r} must be a tensor, got {type(d[key]).__name__}")
                if tuple(d[key].shape) != shape:
                    raise ValueError(f"{key!r} has shape {tuple(d[key].shape)}, but a layer of shape "
                                     f"{state.shape} with r = {r} needs {shape}")
        if ("lora_A.weight" in d) != ("lora_B.weight" in d):
            raise ValueError("the state dict holds only one of 'lora_A.weight' and 'lora_B.weight'")
        layer = cls(in_features, out_features, r, alpha,
                    _quantized=(packed.clone(), _clone_state(state), None if bias is None else bias.detach().clone(),
                                d["weight"].dtype),
                    **options)
        if "lora_A.weight" in d and "lora_B.weight" in d:
            with torch.no_grad():
                layer.lora_A.weight.copy_(d["lora_A.weight"])
                layer.lora_B.weight.copy_(d["lora_B.weight"])
        return layer

    # -- state dict in bitsandbytes' layout --------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        base = to_bnb_state_dict(self.weight, self.quant_state)
        base["weight"] = self.weight  # the parameter itself (a DTensor shard under FSDP): loaders write into it
        if self._meta["storage"] != torch.uint8 and _is_plain(self.weight):
            base["weight"] = _in_storage(self.weight, self._meta["storage"])  # a view: loaders still write into it
        keys = list(base)
        # bitsandbytes' order: weight, bias, then the quant-state entries.
        destination[prefix + "weight"] = base["weight"] if keep_vars else base["weight"].detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for k in keys[1:]:
            destination[prefix + k] = base[k] if keep_vars else base[k].detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = {k[len(prefix):]: v for k, v in state_dict.items()
               if k.startswith(prefix) and k[len(prefix):].split(".")[0] not in self._modules}
        if not any(k == "weight" or k.startswith("weight.") for k in own):
            missing_keys.extend(prefix + k for k in ("weight", "weight.absmax", "weight.quant_map"))
            return
        entries = {k: v for k, v in own.items() if k.startswith("weight")}
        try:
            # Validation reads only the shapes and dtypes of the packed codes and of the 8-bit
            # absmax codes (every byte is a valid code), so uninitialised stand-ins are checked in
            # their place: under FSDP the entries are shards of the whole tensors (DTensors).
            device = self.quant_map.device
            stand_ins = {k: _stand_in(v, "meta" if k == "weight" else device) for k, v in entries.items()
                         if k in ("weight", ABSMAX) and _holds_codes(k, v)}
            _, state = from_bnb_state_dict(dict(entries, **stand_ins))
        except (ValueError, TypeError) as exc:
            error_msgs.append(f"while loading the 4-bit weight at {prefix!r}: {exc}")
            return
        if tuple(state.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {prefix}weight: the checkpoint's shape is {state.shape}, the layer's "
                              f"is ({self.out_features}, {self.in_features})")
            return
        bias = own.get("bias")
        if self.bias is not None and bias is None:
            missing_keys.append(prefix + "bias")
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            error_msgs.append(f"size mismatch for {prefix}bias: {tuple(bias.shape)} vs ({self.out_features},)")
            return
        for k in own:
            if k != "bias" and not k.startswith("weight"):
                unexpected_keys.append(prefix + k)
        if self._has_layout(state, bias):
            self._copy_base(entries, state, bias)
            self._meta["storage"] = entries["weight"].dtype
        elif not _is_plain(self.weight):
            error_msgs.append(f"while loading the 4-bit weight at {prefix!r}: a sharded layer keeps its layout "
                              f"({self.extra_repr()}); the checkpoint's is {state.quant_type}, "
                              f"block {state.blocksize}, double_quant={state.double_quant}, dtype {state.dtype}")
        else:
            packed, codes = _as_bytes(entries["weight"]), entries[ABSMAX]
            if state.nested is not None:
                state = replace(state, nested=replace(state.nested, codes=codes))
            new_bias = None if bias is None else bias.detach().clone().to(device)
            self._set_base(packed.to(device).clone(), _clone_state(state.to(device)), new_bias, entries["weight"].dtype)

    def _has_layout(self, state: QuantState, bias) -> bool:
        """Whether ``state`` (and ``bias``) fit the current tensors, so loading can copy into them."""
        m = self._meta
        nested_blocksize = None if state.nested is None else state.nested.blocksize
        same_bias = (bias is None) if self.bias is None else (bias is None or bias.dtype == self.bias.dtype)
        return (state.dtype == m["dtype"] and state.blocksize == m["blocksize"] and same_bias
                and state.quant_type == m["quant_type"] and nested_blocksize == m["nested_blocksize"])

    @torch.no_grad()
    def _copy_base(self, entries: dict, state: QuantState, bias) -> None:
        """Copy a checkpoint's base into the current tensors in place (their identity is FSDP's handle)."""
        self.weight.copy_(entries["weight"] if entries["weight"].dtype == torch.uint8 else _as_bytes(entries["weight"]))
        self.quant_map.copy_(state.codebook)
        if state.nested is None:
            self.absmax.copy_(state.absmax)
        else:
            self.absmax.copy_(entries[ABSMAX])
            self.nested_absmax.copy_(state.nested.absmax)
            self.nested_quant_map.copy_(state.nested.codebook)
            self.nested_offset.copy_(state.nested.offset)
        if bias is not None:
            self.bias.copy_(bias)

    # -- compute -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x W^T + bias + s B(A(dropout(x)))`` (see ``qlora_gpu.qlora_linear``)."""
        mask = None
        if self.training and self.dropout > 0:
            keep = 1.0 - self.dropout
            mask = torch.empty_like(x).bernoulli_(keep).div_(keep)  # entries 0 or 1 / keep
        return qlora_linear(x, self.weight, self.quant_state, self.lora_A.weight, self.lora_B.weight,
                            scaling=self.scaling, compute_dtype=self.compute_dtype, bias=self.bias,
                            dropout_mask=mask, backend=self.backend)

    @torch.no_grad()
    def merged_weight(self, dtype=torch.float32) -> torch.Tensor:
        """Return the dense merged weight ``W + s B A`` (fast pair of ``qlora_ref.lora_merge``).

        ``W`` is decoded exactly to float32; the sum is computed in float32 and cast to ``dtype``.

        Returns
        -------
        Tensor, shape (out_features, in_features), ``dtype``

        Examples
        --------
        >>> layer = QLoRALinear(64, 8, r=2)
        >>> bool(torch.equal(layer.merged_weight(), layer.dequantized_weight()))  # B = 0
        True
        """
        W = self.dequantized_weight(torch.float32)
        delta = self.lora_B.weight.to(torch.float32) @ self.lora_A.weight.to(torch.float32)  # (out, in)
        return (W + self.scaling * delta).to(dtype)

    @torch.no_grad()
    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """Return the decoded base weight ``(out, in)`` in ``dtype`` (exact decode, then one rounding)."""
        return dequantize_4bit(self.weight, self.quant_state, dtype=dtype, backend=self.backend)

    def extra_repr(self) -> str:
        m = self._meta
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"quant_type={m['quant_type']!r}, blocksize={m['blocksize']}, "
                f"double_quant={m['nested_blocksize'] is not None}, rslora={self.rslora}, dropout={self.dropout}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}")


def _is_plain(t: torch.Tensor) -> bool:
    """Whether ``t`` is an ordinary tensor, not a subclass such as the DTensor shard FSDP puts in place."""
    return type(t) in (torch.Tensor, nn.Parameter)


def _holds_codes(key: str, t) -> bool:
    """Whether an entry holds 4-bit or 8-bit codes, whose values need no check (every byte is valid)."""
    return isinstance(t, torch.Tensor) and (key == "weight" or t.dtype == torch.uint8)


def _stand_in(t: torch.Tensor, device) -> torch.Tensor:
    """An uninitialised tensor with ``t``'s (global) shape and dtype on ``device``."""
    return torch.empty(t.shape, dtype=t.dtype, device=device)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The packed codes as ``(nbytes, 1)`` uint8 (a ``quant_storage`` dtype only reinterprets them)."""
    return t.detach().contiguous().view(torch.uint8).reshape(-1, 1)


def _in_storage(t: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """The ``(nbytes, 1)`` uint8 codes viewed as ``(nbytes // itemsize, 1)`` of ``storage`` (same memory)."""
    return t.reshape(-1).view(storage).reshape(-1, 1)


def _clone_state(state: QuantState) -> QuantState:
    """A copy of a state whose tensors own their memory (a loaded dict may be reused)."""

    nested = None
    if state.nested is not None:
        n = state.nested
        nested = replace(n, codes=n.codes.clone(), absmax=n.absmax.clone(), codebook=n.codebook.clone(),
                         offset=n.offset.clone())
    return replace(state, codebook=state.codebook.clone(), absmax=None if state.absmax is None else state.absmax.clone(),
                   nested=nested)

