"""Turn a model's linear layers into ``QLoRALinear`` layers, by name pattern, and freeze the rest.

The model-level helper for fine-tuning a small model end to end with QLoRA, as PEFT's
``target_modules`` does it (no oracle pair: it only moves modules around; the layers it makes
are ``qlora_gpu.linear.QLoRALinear``).

Public API
----------
``replace_linear_with_qlora(model, target_modules, *, r=8, alpha=16, **options)`` -> list of names
    Replaces every ``nn.Linear`` whose qualified name matches, in place; ``options`` are
    ``QLoRALinear``'s keyword arguments (``quant_type``, ``blocksize``, ``double_quant``,
    ``rslora``, ``dropout``, ``compute_dtype``, ``adapter_dtype``, ``backend``). Afterwards only
    the adapters (``lora_A.weight``, ``lora_B.weight``) require gradients.
``adapter_state_dict(model)`` -> ``{name: tensor}``: the adapters only, PEFT-style names.
``trainable_parameters(model)`` -> ``(trainable, total)`` element counts (the 4-bit state not counted).
``save_peft_adapter(model, folder, ...)`` -> ``Path``: the adapters as a PEFT LoRA adapter folder.

Note: target_modules matching (PEFT's rule)
    A list of strings matches a module whose qualified name equals an entry or ends with
    ``"." + entry`` (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``); a single string
    is a regular expression that must match the whole qualified name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch  # noqa: F401  (the Examples pass torch dtypes)
from safetensors.torch import save_file
from torch import nn

from qlora_gpu.linear import QLoRALinear
from qlora_ref.formats.peft import PEFT_PREFIX

__all__ = ["replace_linear_with_qlora", "adapter_state_dict", "trainable_parameters", "matches_target",
           "save_peft_adapter"]



def matches_target(name: str, target_modules) -> bool:
    """Whether a module's qualified name matches ``target_modules`` (Note: target_modules matching).

    Examples
    --------
    >>> matches_target("model.layers.0.self_attn.q_proj", ["q_proj", "v_proj"])
    True
    >>> matches_target("model.layers.0.self_attn.q_proj", r".*\\.(q|k)_proj")
    True
    >>> matches_target("model.layers.0.mlp.up_proj", ["proj"])
    False
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def replace_linear_with_qlora(model: nn.Module, target_modules, *, r: int = 8, alpha: float = 16,
                              freeze: bool = True, **options) -> list:
    """Swap matching ``nn.Linear`` layers of ``model`` for ``QLoRALinear`` layers, in place.

    Parameters
    ----------
    model : nn.Module
    target_modules : list of str, or str (a regular expression)
        See Note: target_modules matching.
    r, alpha : int, float
        Adapter rank and ``lora_alpha`` of every new layer.
    freeze : bool
        Set ``requires_grad=False`` on every parameter except the new adapters.
    **options
        Keyword arguments of ``QLoRALinear`` (``quant_type="nf4"``, ``double_quant=True``, ...).

    Returns
    -------
    list of str
        Qualified names of the replaced layers, in module order.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module`` or ``target_modules`` is neither a str nor a list
        of str.
    ValueError
        If no ``nn.Linear`` matches (PEFT raises too: a typo would otherwise train nothing).

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> replace_linear_with_qlora(model, ["0", "2"], r=4, compute_dtype=torch.float32)
    ['0', '2']
    >>> trainable_parameters(model)
    (800, 872)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(target_modules, str) and not (
            isinstance(target_modules, (list, tuple, set)) and all(isinstance(t, str) for t in target_modules)):
        raise TypeError("target_modules must be a regular expression string or a list of module names")
    names = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and name and matches_target(name, target_modules)]
    if not names:
        raise ValueError(f"no nn.Linear in the model matches target_modules={target_modules!r}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QLoRALinear.from_linear(getattr(parent, child), r=r, alpha=alpha, **options))
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, QLoRALinear):
                m.lora_A.weight.requires_grad_(True)
                m.lora_B.weight.requires_grad_(True)
    return names


def adapter_state_dict(model: nn.Module) -> dict:
    """Return the adapters of every ``QLoRALinear`` in ``model`` (``<name>.lora_A.weight``, ...).

    Examples
    --------
    >>> model = nn.Sequential(QLoRALinear(64, 64, r=2))
    >>> sorted(adapter_state_dict(model))
    ['0.lora_A.weight', '0.lora_B.weight']
    """
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QLoRALinear):
            prefix = f"{name}." if name else ""
            out[prefix + "lora_A.weight"] = m.lora_A.weight.detach()
            out[prefix + "lora_B.weight"] = m.lora_B.weight.detach()
    return out


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Return ``(trainable, total)`` parameter element counts, the 4-bit state not counted.

    The packed codes and absmax codes of a ``QLoRALinear`` are frozen uint8 parameters only so
    that FSDP shards them (``qlora_gpu.linear``, Note: what FSDP shards); they are storage,
    not parameters of the model, and are left out of ``total``.

    Examples
    --------
    >>> trainable_parameters(nn.Linear(4, 2))
    (10, 10)
    """
    storage = {id(t) for m in model.modules() if isinstance(m, QLoRALinear) for t in (m.weight, m.absmax)}
    params = [p for p in model.parameters() if id(p) not in storage]
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, total



def save_peft_adapter(model: nn.Module, folder, *, base_model_name_or_path: str | None = None,
                      task_type: str | None = "CAUSAL_LM", state_dict: dict | None = None) -> Path:
    """Write the adapters of every ``QLoRALinear`` in ``model`` as a PEFT LoRA adapter folder.

    The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with one
    ``base_model.model.<name>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r) per layer
    (docs/spec.md, section 7.3), so ``peft.PeftModel.from_pretrained`` loads it onto the base
    model and ``qlora_ref.formats.peft.read_adapter`` reads it. The config is made from the layers:
    ``target_modules`` lists their exact names, ``r`` and ``lora_alpha`` are the first layer's and
    a layer that differs gets a ``rank_pattern`` / ``alpha_pattern`` entry under its full name, so
    every layer keeps its scaling (Note: adapter scaling in ``qlora_ref.formats.peft``).

    Parameters
    ----------
    model : nn.Module
        A model with at least one ``QLoRALinear`` (for example after ``replace_linear_with_qlora``).
    folder : str or Path
        Created if missing; the two files in it are overwritten.
    base_model_name_or_path : str, optional
        Recorded in the config (PEFT uses it when no base model is passed).
    task_type : str or None
        PEFT's task type (``"CAUSAL_LM"``, ...), or None.
    state_dict : dict, optional
        Where to take the adapter tensors from (``<layer>.lora_A.weight``, ...), for a model
        sharded by FSDP, whose own adapters are shards: its whole state dict
        (``qlora_gpu.fsdp.full_state_dict``, on rank 0). Default: the model's adapters.

    Returns
    -------
    Path
        The folder.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``.
    ValueError
        If the model has no ``QLoRALinear``, or its layers differ in rsLoRA or dropout (PEFT's
        config holds one value of each), or ``state_dict`` lacks a layer's adapter.

    Examples
    --------
    >>> import tempfile
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> replace_linear_with_qlora(model, ["0", "2"], r=4, alpha=8, compute_dtype=torch.float32)
    ['0', '2']
    >>> with tempfile.TemporaryDirectory() as d:
    ...     folder = save_peft_adapter(model, d)
    ...     config = json.loads((folder / "adapter_config.json").read_text())
    >>> config["r"], config["lora_alpha"], config["target_modules"]
    (4, 8, ['0', '2'])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QLoRALinear)}
    if not layers:
        raise ValueError("the model has no QLoRALinear layer to save")
    first = next(iter(layers.values()))
    for what in ("rslora", "dropout"):
        values = {getattr(m, what) for m in layers.values()}
        if len(values) > 1:
            raise ValueError(f"the layers differ in {what} ({sorted(values)}); a PEFT config holds one value")
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": first.dropout, "use_rslora": first.rslora,
        "use_dora": False, "bias": "none", "target_modules": list(layers),
        "rank_pattern": {name: m.r for name, m in layers.items() if m.r != first.r},
        "alpha_pattern": {name: m.alpha for name, m in layers.items() if m.alpha != first.alpha},
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = adapter_state_dict(model)
    if state_dict is not None:
        missing = sorted(k for k in source if k not in state_dict)
        if missing:
            raise ValueError(f"state_dict has no {missing[0]!r} ({len(missing)} adapter tensors missing)")
        source = {k: state_dict[k] for k in source}
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in source.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
