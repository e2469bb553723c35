"""Shapes of decoder-only transformers, and the well-known open models shipped as data.

``ModelShape`` holds what memory depends on (hidden and intermediate sizes, layers, heads, key/value
heads, head dimension, vocabulary, tied embeddings, MLP and norm kinds, biases). The shapes of
well-known open models are excerpts of their ``config.json`` in ``qlora_ref/memory/models.json``,
loaded with ``importlib.resources``; each keeps its source and its published parameter count,
which ``ModelShape.num_parameters`` reproduces exactly (``tests/test_memory.py``).

Used by ``qlora_ref.memory`` (the memory calculator) and ``qlora_ref.cli.memory``.
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass
from importlib import resources

__all__ = [
    "ModelShape",
    "LINEAR_NAMES",
    "NORMS",
    "shape_from_config",
    "load_models",
    "model_shape",
    "published_parameters",
]

#: PEFT-style names of the linear layers in one decoder layer, in forward order.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Norm kinds: (weight vectors per norm, float32 statistics per token it keeps for backward).
NORMS = {"rmsnorm": (1, 1), "layernorm": (2, 2)}


def check_positive_int(what: str, value) -> int:
    """Return ``value`` if it is an int > 0; else TypeError or ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{what} must be positive, got {value}")
    return value


@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder-only transformer: what its memory depends on.

    Attributes
    ----------
    name : str
    hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, vocab_size : int
        transformers' ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
        ``num_attention_heads``, ``num_key_value_heads``, ``vocab_size``.
    head_dim : int, optional
        Default ``hidden_size // num_heads``.
    tie_embeddings : bool
        The output head shares the embedding matrix.
    mlp : {"gated", "plain"}
        ``gated``: ``down(act(gate(x)) * up(x))`` (SwiGLU, GeGLU). ``plain``:
        ``down(act(up(x)))`` (GPT, Phi; their ``fc1``/``fc2`` are called ``up_proj``/``down_proj`` here).
    norm : {"rmsnorm", "layernorm"}
        A LayerNorm has a bias as well as a weight.
    norms_per_layer : int
        2 for sequential blocks, 1 for a parallel attention/MLP block (Phi).
    bias : tuple of str
        Linear layers with a bias: names from ``LINEAR_NAMES``, and ``"lm_head"``.
    source : str
        Where the figures come from.
    """

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int | None = None
    tie_embeddings: bool = False
    mlp: str = "gated"
    norm: str = "rmsnorm"
    norms_per_layer: int = 2
    bias: tuple = ()
    source: str = ""

    def __post_init__(self):
        for f in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"):
            check_positive_int(f, getattr(self, f))
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}; give head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        check_positive_int("head_dim", self.head_dim)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.mlp not in ("gated", "plain"):
            raise ValueError(f"mlp must be 'gated' or 'plain', got {self.mlp!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)}, got {self.norm!r}")
        if self.norms_per_layer not in (1, 2):
            raise ValueError(f"norms_per_layer must be 1 or 2, got {self.norms_per_layer!r}")
        object.__setattr__(self, "bias", tuple(self.bias))
        unknown = set(self.bias) - set(self.linear_layers()) - {"lm_head"}
        if unknown:
            raise ValueError(f"bias names unknown linear layers {sorted(unknown)}")

    def linear_layers(self) -> dict:
        """Return ``{name: (out_features, in_features)}`` of one decoder layer's linear layers.

        Examples
        --------
        >>> model_shape("llama-2-70b").linear_layers()["k_proj"]
        (1024, 8192)
        """
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        layers = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
        if self.mlp == "gated":
            layers["gate_proj"] = (i, h)
        layers.update(up_proj=(i, h), down_proj=(h, i))
        return layers

    def num_parameters(self) -> int:
        """Return the number of parameters: linear weights and biases, norms, embeddings, head.

        Examples
        --------
        >>> model_shape("llama-2-7b").num_parameters()
        6738415616
        """
        layers = self.linear_layers()
        per_layer = sum(o * i for o, i in layers.values()) + sum(layers[n][0] for n in self.bias if n in layers)
        norm_params = NORMS[self.norm][0] * self.hidden_size
        per_layer += self.norms_per_layer * norm_params
        head = 0 if self.tie_embeddings else self.vocab_size * self.hidden_size
        head += self.vocab_size if "lm_head" in self.bias else 0
        return self.num_layers * per_layer + self.vocab_size * self.hidden_size + head + norm_params


@functools.lru_cache(maxsize=1)
def _models_json() -> dict:
    text = resources.files("qlora_ref.memory").joinpath("models.json").read_text(encoding="utf-8")
    return json.loads(text)


#: transformers' config.json keys, by ``ModelShape`` field.
_CONFIG_KEYS = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "vocab_size": "vocab_size",
    "head_dim": "head_dim",
    "tie_embeddings": "tie_word_embeddings",
}


def shape_from_config(name: str, config: dict, architecture: dict | None = None, source: str = "") -> ModelShape:
    """Build a ``ModelShape`` from a transformers ``config.json`` dict.

    ``num_key_value_heads`` defaults to ``num_attention_heads`` and ``head_dim`` to
    ``hidden_size // num_attention_heads``, as in transformers. ``architecture`` gives what the
    modeling code fixes rather than the config: ``mlp``, ``norm``, ``norms_per_layer``, ``bias``.

    Raises
    ------
    ValueError
        If a required key is missing or a value is not valid.

    Examples
    --------
    >>> shape_from_config("tiny", {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
    ...                            "num_attention_heads": 4, "vocab_size": 96}).num_kv_heads
    4
    """
    required = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_size")
    missing = [_CONFIG_KEYS[f] for f in required if _CONFIG_KEYS[f] not in config]
    if missing:
        raise ValueError(f"config of {name!r} lacks {missing}")
    kwargs = {f: config[key] for f, key in _CONFIG_KEYS.items() if config.get(key) is not None}
    kwargs.setdefault("num_kv_heads", kwargs["num_heads"])
    return ModelShape(name=name, source=source, **kwargs, **(architecture or {}))


def load_models() -> dict:
    """Return ``{name: ModelShape}`` for the models shipped in ``qlora_ref/memory/models.json``.

    Examples
    --------
    >>> "llama-2-7b" in load_models()
    True
    """
    return {
        name: shape_from_config(name, entry["config"], entry["architecture"], entry["source"]["repository"])
        for name, entry in _models_json()["models"].items()
    }


def published_parameters(name: str) -> int:
    """The published parameter count of a shipped model, as stored beside its shape."""
    model_shape(name)  # a clear error for an unknown name
    return int(_models_json()["models"][name]["parameters"])


def model_shape(name: str) -> ModelShape:
    """Return the shape of a shipped model by name (see ``load_models``).

    Raises
    ------
    ValueError
        If the name is unknown; the message lists the closest names.

    Examples
    --------
    >>> model_shape("llama-3-8b").num_kv_heads
    8
    """
    models = load_models()
    if name not in models:
        close = difflib.get_close_matches(str(name), list(models), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} Known models: {', '.join(sorted(models))}")
    return models[name]
