"""PEFT LoRA adapter folders on a 4-bit checkpoint: read, match, and compute with the oracle.

An adapter folder holds ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``,
``use_dora``, ``rank_pattern``, ``alpha_pattern``, ...) and ``adapter_model.safetensors`` with
keys ``base_model.model.<module>.lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r) and,
for DoRA, ``...lora_magnitude_vector`` (out,) (docs/spec.md, section 7.3). This module
reads them, matches each adapted module to its base weight in a ``qlora_ref.formats.checkpoint``
checkpoint, and computes a layer's forward pass (``qlora_ref.qlora.qlora_forward``, or
``qlora_ref.dora.dora_forward`` for DoRA) or its merged weight with the oracle. Comparator in the
tests: PEFT's ``lora.Linear4bit`` on the same files.

Note: adapter scaling
    For a module ``M``, ``r`` and ``alpha`` are ``rank_pattern`` / ``alpha_pattern`` entries
    whose pattern ``p`` matches the module name as the regular expression ``(.*\\.)?(p)$`` (the
    first such entry, as PEFT looks them up), else the config's ``r`` and ``lora_alpha``; the
    scaling is ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``. The ``r`` found must
    equal the number of rows of ``lora_A``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qlora_ref.dora import dora_forward, dora_merge
from qlora_ref.formats.checkpoint import Checkpoint, read_safetensors
from qlora_ref.formats.safe_io import read_json_file
from qlora_ref.lora import lora_forward, lora_merge, lora_scaling
from qlora_ref.qlora import qlora_base_weight

try:  # the standard library's regex parser (public as sre_parse before Python 3.11)
    import re._parser as sre_parse
except ImportError:  # pragma: no cover  (Python 3.10)
    import sre_parse

__all__ = ["LoraLayer", "Adapter", "read_adapter", "match_adapter", "adapter_forward", "merged_weight"]

#: The prefix of every tensor key in adapter_model.safetensors (docs/spec.md, section 7.3).
PEFT_PREFIX = "base_model.model."
_SUFFIXES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "magnitude"}


@dataclass(frozen=True)
class LoraLayer:
    """One adapted module of a PEFT adapter.

    Attributes
    ----------
    module : str
        The module's name in the base model (``model.layers.0.self_attn.q_proj``).
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    magnitude : ndarray, shape (out,), or None
        DoRA's ``m``; None for plain LoRA.
    r : int
    alpha : float
    scaling : float
        ``alpha / r`` or ``alpha / sqrt(r)`` (Note: adapter scaling).
    """

    module: str
    A: np.ndarray
    B: np.ndarray
    magnitude: np.ndarray | None
    r: int
    alpha: float
    scaling: float

    @property
    def use_dora(self) -> bool:
        """Whether the layer is DoRA (it has a magnitude vector)."""
        return self.magnitude is not None


@dataclass
class Adapter:
    """A read PEFT adapter folder: its config and its layers by module name."""

    path: Path
    config: dict
    layers: dict


#: Longest ``rank_pattern`` / ``alpha_pattern`` key, and most unbounded repeats (``*``, ``+``,
#: ``{n,}``) in one; see Note: bounded patterns.
MAX_PATTERN_CHARS = 512
MAX_PATTERN_REPEATS = 2
#: Longest module name a pattern is matched against.
MAX_MODULE_CHARS = 1024


def _check_pattern_tree(items, where: str, inside_repeat: bool, repeats: list) -> None:
    for op, av in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, sub = av
            if inside_repeat:
                raise ValueError(f"{where}: a repeat inside a repeat (nested quantifiers) can take "
                                 f"exponential time; refused")
            if high == sre_parse.MAXREPEAT or high > 64:
                repeats.append(1)
            _check_pattern_tree(sub, where, True, repeats)
        elif name == "BRANCH":
            if inside_repeat:
                raise ValueError(f"{where}: an alternation inside a repeat can take exponential time; refused")
            for sub in av[1]:
                _check_pattern_tree(sub, where, inside_repeat, repeats)
        elif name == "SUBPATTERN":
            _check_pattern_tree(av[-1], where, inside_repeat, repeats)
        elif name in ("ASSERT", "ASSERT_NOT"):
            _check_pattern_tree(av[1], where, inside_repeat, repeats)
        elif name in ("GROUPREF", "GROUPREF_EXISTS"):
            raise ValueError(f"{where}: back-references are refused (they can take exponential time)")


def check_pattern(pattern, where: str) -> re.Pattern:
    r"""Compile a ``rank_pattern`` / ``alpha_pattern`` key, refusing patterns that can hang.

    Raises
    ------
    TypeError
        If ``pattern`` is not a string.
    ValueError
        If it is not a valid regular expression, is longer than ``MAX_PATTERN_CHARS``, nests a
        repeat or an alternation inside a repeat, uses a back-reference, or has more than
        ``MAX_PATTERN_REPEATS`` unbounded repeats (see Note: bounded patterns).

    Examples
    --------
    >>> check_pattern(r"layers\.0\..*_proj", "config").fullmatch("layers.0.q_proj") is not None
    True
    >>> check_pattern("(.|.)*x", "config")
    Traceback (most recent call last):
    ...
    ValueError: config: pattern '(.|.)*x': an alternation inside a repeat can take exponential time; refused
    """
    if not isinstance(pattern, str):
        raise TypeError(f"{where}: pattern {pattern!r} must be a string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"{where}: pattern of {len(pattern)} characters; at most {MAX_PATTERN_CHARS} are read")
    label = f"{where}: pattern {pattern!r}"
    try:
        compiled = re.compile(pattern)
        tree = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"{label} is not a valid regular expression ({exc})") from None
    repeats: list = []
    _check_pattern_tree(tree, label, False, repeats)
    if len(repeats) > MAX_PATTERN_REPEATS:
        raise ValueError(f"{label}: {len(repeats)} unbounded repeats; at most {MAX_PATTERN_REPEATS} are allowed")
    return compiled


def _pattern_value(patterns: dict, module: str, default, where: str = "pattern"):
    r"""PEFT's rule ``re.match(rf"(.*\.)?({pattern})$", module)``, run as a full match of each
    dot-separated suffix of ``module``, so the ``(.*\.)?`` prefix adds no backtracking."""
    if len(module) > MAX_MODULE_CHARS:
        raise ValueError(f"{where}: module name of {len(module)} characters; at most {MAX_MODULE_CHARS}")
    suffixes = [module] + [module[i + 1:] for i, ch in enumerate(module) if ch == "."]
    for pattern, value in (patterns or {}).items():
        compiled = check_pattern(pattern, where)
        if any(compiled.fullmatch(s) for s in suffixes):
            return value
    return default


def _check_config(path: Path, config) -> dict:
    if not isinstance(config, dict):
        raise ValueError(f"{path}: adapter_config.json must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA adapters are read")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{path}: adapter_config.json field {key!r} is {value!r}; expected a number >= 0")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{path}: fan_in_fan_out adapters (GPT-2 Conv1D layers) are not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise ValueError(f"{path}: adapter_config.json field {key!r} must be an object")
        for pattern, value in (config.get(key) or {}).items():
            check_pattern(pattern, f"{path}: {key}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{path}: {key} value {value!r} for {pattern!r} must be a number >= 0")
    return config


def read_adapter(path) -> Adapter:
    """Read a PEFT LoRA (or DoRA) adapter folder.

    Parameters
    ----------
    path : str or Path
        The folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns
    -------
    Adapter
        ``layers`` maps each adapted module's base-model name to its ``LoraLayer``.

    Raises
    ------
    FileNotFoundError
        If a file is missing.
    ValueError
        Naming the file, tensor and problem: a config that is not JSON or lacks ``r`` or
        ``lora_alpha``; a tensor key that is not ``base_model.model.<module>.<lora tensor>``;
        a module missing ``lora_A`` or ``lora_B``; shapes that do not fit together (``A`` (r, in),
        ``B`` (out, r), magnitude (out,)); a rank that differs from the config's.

    Examples
    --------
    >>> import json, os, tempfile
    >>> from safetensors.numpy import save_file
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = open(os.path.join(d, "adapter_config.json"), "w").write(json.dumps({"r": 2, "lora_alpha": 4}))
    ...     save_file({"base_model.model.proj.lora_A.weight": np.ones((2, 8), np.float32),
    ...                "base_model.model.proj.lora_B.weight": np.zeros((4, 2), np.float32)},
    ...               os.path.join(d, "adapter_model.safetensors"))
    ...     adapter = read_adapter(d)
    >>> layer = adapter.layers["proj"]
    >>> layer.r, layer.scaling, layer.use_dora
    (2, 2.0, False)
    """
    path = Path(path)
    config_path, weights_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{path}: no {p.name}")
    config = _check_config(config_path, read_json_file(config_path))
    _, tensors = read_safetensors(weights_path)
    parts: dict = {}
    for key, a in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{weights_path}: tensor {key!r} does not start with {PEFT_PREFIX!r}")
        rest = key[len(PEFT_PREFIX):]
        for suffix, role in _SUFFIXES.items():
            if rest.endswith("." + suffix):
                parts.setdefault(rest[: -len(suffix) - 1], {})[role] = (key, a)
                break
        else:
            raise ValueError(f"{weights_path}: tensor {key!r} is not a lora_A, lora_B or DoRA magnitude tensor")
    layers = {}
    for module, roles in sorted(parts.items()):
        layers[module] = _layer(weights_path, config, module, roles)
    return Adapter(path, config, layers)


def _layer(path, config, module, roles) -> LoraLayer:
    for role in ("A", "B"):
        if role not in roles:
            raise ValueError(f"{path}: module {module!r} has no lora_{role}.weight")
    (key_a, A), (key_b, B) = roles["A"], roles["B"]
    for key, a in ((key_a, A), (key_b, B)):
        if a.ndim != 2 or a.dtype.kind != "f":
            raise ValueError(f"{path}: tensor {key!r} must be a 2-D float matrix, got {a.dtype} {a.shape}")
        if not np.all(np.isfinite(a.astype(np.float32))):
            raise ValueError(f"{path}: tensor {key!r} holds NaN or Inf")
    r = A.shape[0]
    if B.shape[1] != r:
        raise ValueError(f"{path}: tensor {key_b!r} has shape {B.shape}, but {key_a!r} {A.shape} needs ({B.shape[0]}, {r})")
    r_config = _pattern_value(config.get("rank_pattern"), module, config["r"], f"{path}: rank_pattern")
    if r_config != r:
        raise ValueError(f"{path}: tensor {key_a!r} has rank {r}, but adapter_config.json gives r = {r_config} for {module!r}")
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"], f"{path}: alpha_pattern"))
    scaling = lora_scaling(alpha, r, rslora=bool(config.get("use_rslora", False)))
    magnitude = None
    if "magnitude" in roles:
        key_m, magnitude = roles["magnitude"]
        if magnitude.shape != (B.shape[0],) or magnitude.dtype.kind != "f":
            raise ValueError(f"{path}: tensor {key_m!r} has shape {magnitude.shape}; DoRA needs ({B.shape[0]},) floats")
    elif config.get("use_dora"):
        raise ValueError(f"{path}: use_dora is set but module {module!r} has no lora_magnitude_vector")
    return LoraLayer(module, A, B, magnitude, r, alpha, scaling)


def match_adapter(adapter: Adapter, checkpoint: Checkpoint) -> dict:
    """Match each adapted module to its base weight in a checkpoint.

    Returns
    -------
    dict of str to str
        Module name to ``"4bit"`` (a 4-bit layer) or ``"dense"`` (a plain ``<module>.weight``).

    Raises
    ------
    ValueError
        If a module has no base weight, or its shape does not fit ``A`` (r, in) and ``B`` (out, r).
    """
    matched = {}
    for module, layer in adapter.layers.items():
        if module in checkpoint.layers:
            shape, kind = tuple(checkpoint.layers[module].state.shape), "4bit"
        elif f"{module}.weight" in checkpoint.tensors:
            shape, kind = checkpoint.tensors[f"{module}.weight"].shape, "dense"
        else:
            raise ValueError(f"{adapter.path}: module {module!r} has no base weight in {checkpoint.path}")
        expected = (layer.B.shape[0], layer.A.shape[1])
        if tuple(shape) != expected:
            raise ValueError(f"{adapter.path}: module {module!r}: the base weight has shape {tuple(shape)}, "
                             f"but lora_B @ lora_A has shape {expected}")
        matched[module] = kind
    return matched


def _base(checkpoint: Checkpoint, module: str, compute_dtype) -> np.ndarray:
    """The base weight as the layer uses it: decoded and rounded to the compute dtype (float64)."""

    if module in checkpoint.layers:
        layer = checkpoint.layers[module]
        return qlora_base_weight(layer.packed, layer.state, compute_dtype=compute_dtype or layer.state.dtype)
    W = checkpoint.tensors[f"{module}.weight"]
    return (W if compute_dtype is None else W.astype(compute_dtype)).astype(np.float64)


def adapter_forward(adapter: Adapter, checkpoint: Checkpoint, module: str, x, *, compute_dtype=None,
                    dropout_mask=None) -> np.ndarray:
    """One adapted layer's output with the oracle: LoRA (or DoRA) on the decoded base.

    Parameters
    ----------
    adapter, checkpoint
        From ``read_adapter`` and ``qlora_ref.formats.checkpoint.read_checkpoint``.
    module : str
        The module name (a key of ``adapter.layers``).
    x : ndarray, shape (..., in), float
    compute_dtype : {"bfloat16", "float16", "float32"}, optional
        The dtype the base weight is rounded to before the matmul (bitsandbytes'
        ``bnb_4bit_compute_dtype``); default the 4-bit state's dtype.
    dropout_mask : ndarray, shape (..., in), optional

    Returns
    -------
    ndarray, shape (..., out), float64
        ``x W_c^T + bias + s ((d x) A^T) B^T`` (``qlora_ref.qlora``), or DoRA's output
        (``qlora_ref.dora``) when the layer has a magnitude vector; ``bias`` is the checkpoint's
        ``<module>.bias`` when present.

    Raises
    ------
    KeyError
        If the adapter has no such module.
    ValueError
        As ``match_adapter`` and the LoRA functions.
    """

    layer = adapter.layers[module]
    match_adapter(Adapter(adapter.path, adapter.config, {module: layer}), checkpoint)
    W = _base(checkpoint, module, compute_dtype)  # (out, in) float64
    bias = checkpoint.tensors.get(f"{module}.bias")
    if layer.use_dora:
        return dora_forward(x, W, layer.A, layer.B, layer.magnitude, scaling=layer.scaling, bias=bias,
                            dropout_mask=dropout_mask)
    return lora_forward(x, W, layer.A, layer.B, scaling=layer.scaling, bias=bias, dropout_mask=dropout_mask)


def merged_weight(adapter: Adapter, checkpoint: Checkpoint, module: str) -> np.ndarray:
    """The module's weight with the adapter merged in, float64 (not re-quantized).

    Returns
    -------
    ndarray, shape (out, in), float64
        ``W + s B A`` with ``W`` the exactly decoded base (float32 values), or DoRA's
        ``m * V / ||V||`` rows (``qlora_ref.dora.dora_merge``). ``qlora_ref.qlora.merge_into_4bit``
        re-quantizes such a weight when a 4-bit result is wanted.
    """

    layer = adapter.layers[module]
    match_adapter(Adapter(adapter.path, adapter.config, {module: layer}), checkpoint)
    W = _base(checkpoint, module, "float32")
    if layer.use_dora:
        return dora_merge(W, layer.A, layer.B, layer.magnitude, scaling=layer.scaling)
    return lora_merge(W, layer.A, layer.B, layer.scaling)
