"""Activations a fine-tune keeps for its backward pass, in bytes, and the transient peak.

Pairs with ``qlora_ref.memory`` (which adds these items to the weights, adapters and optimizer
state) and with what autograd really saves: ``tests/test_memory.py`` counts the tensors a
transformers model with PEFT adapters hands to ``torch.autograd.graph.saved_tensors_hooks``
and compares them with ``layer_activation_terms`` byte for byte.

Note: activations kept for backward
    Measured, not guessed: these are the tensors autograd saves in a transformers decoder
    (LLaMA-style: pre-norm, RMSNorm, RoPE, SDPA attention, SwiGLU) with a frozen 4-bit base and
    PEFT LoRA adapters, confirmed tensor by tensor with ``torch.autograd.graph.saved_tensors_hooks``
    (``tests/test_memory.py``). Per token and per decoder layer, with ``h`` hidden size,
    ``q = heads * head_dim``, ``kv = kv_heads * head_dim``, ``i`` intermediate size and ``c``
    bytes of the compute dtype:

    - each norm's input, in float32 (transformers' RMSNorm upcasts before normalizing; a
      LayerNorm runs in float32 under autocast), plus its float32 statistics;
    - the input of the adapted linear layers, once per distinct tensor, ``c`` bytes (a frozen
      4-bit or 16-bit linear keeps nothing: its input gradient needs only ``W``; the LoRA
      branch needs ``x`` for ``dA`` and ``A x`` for ``dB``); with LoRA dropout each adapter
      keeps its own dropped copy and a mask (one byte, as CUDA's fused dropout keeps it);
    - ``A x`` of every adapter: ``r`` values;
    - attention: SDPA (flash or memory-efficient) keeps ``q``, ``k``, ``v`` after RoPE
      (``q + 2 kv``), its output (``q``; the contiguous input of ``o_proj`` shares its storage)
      and a float32 log-sum-exp per head; eager attention keeps ``q`` and ``k``, ``v`` repeated
      to all heads (``3 q``), the float32 softmax and its compute-dtype copy (``heads * s``
      each), and the input of ``o_proj`` only when it is adapted;
    - SwiGLU MLP: the gate output, its activation and the up output (``3 i``), and the product
      (``i``) only when ``down_proj`` is adapted; a plain MLP keeps the ``up_proj`` output and
      the activation's output only when ``down_proj`` is adapted.

    Once per step: the final norm's input (float32), the logits in the compute dtype (held by
    the model's output) and in float32 (kept by the loss's log-softmax), the int64 labels, and
    the RoPE cos/sin tables (``2 * s * head_dim``). Full fine-tuning adds what trainable weights
    need: every linear input, each norm's normalized input, the head's input and the input ids.
    With activation checkpointing each decoder layer keeps only its input (``h`` values in the
    compute dtype) and the backward pass recomputes one layer at a time. All of a layer's
    tensors are counted for every layer: this assumes the embedding output requires grad, as
    ``prepare_model_for_kbit_training`` arranges (without it layer 0 keeps only what follows
    its first adapter).

    The standard estimate is Korthikanti et al. 2022 ("Reducing Activation Recomputation in
    Large Transformer Models", section 4.1): ``s b h (34 + 5 a s / h)`` bytes per layer for a
    GPT layer trained in 16-bit with dropout. For the same layer fully fine-tuned this model
    counts ``36 s b h`` plus the norm statistics and the log-sum-exp: it keeps the two norm
    inputs in float32 (``+4``), has no dropout masks (``-2``), and with SDPA drops the
    ``5 a s / h`` term (the attention scores are never stored). ``korthikanti_activation_bytes`` computes the published formula for comparison.
"""

from __future__ import annotations

from qlora_ref.memory.shapes import NORMS, ModelShape
from qlora_ref.state import INPUT_DTYPES

__all__ = ["PHASES", "layer_activation_terms", "activation_items", "korthikanti_activation_bytes"]

_FLOAT32 = 4
_INT64 = 8


def layer_activation_terms(model, setup) -> list:
    """What one decoder layer keeps for backward without checkpointing, per token.

    Parameters
    ----------
    model : qlora_ref.memory.shapes.ModelShape
    setup : qlora_ref.memory.FinetuneSetup

    Returns
    -------
    list of (str, int)
        ``(what, bytes per token)``; the layer keeps ``sum(bytes) * batch * seq_len`` bytes.

    Notes
    -----
    See Note: activations kept for backward.

    Examples
    --------
    >>> from qlora_ref.memory import FinetuneSetup, model_shape
    >>> terms = layer_activation_terms(model_shape("llama-2-7b"), FinetuneSetup())
    >>> sum(nbytes for _, nbytes in terms)
    171016
    """
    c = INPUT_DTYPES[setup.compute_dtype].itemsize
    a = INPUT_DTYPES[setup.adapter_dtype].itemsize
    h, i, r, s = model.hidden_size, model.intermediate_size, setup.rank, setup.seq_len
    layers = model.linear_layers()
    q_dim, kv_dim = layers["q_proj"][0], layers["k_proj"][0]
    adapted = set(setup.targets(model))
    keeps_input = set(layers) if setup.full_finetune else adapted
    norm_stats = NORMS[model.norm][1] * _FLOAT32
    terms = []

    def linear_inputs(what, width, readers, shared=False):
        """The input of ``readers`` (one tensor, ``shared`` when another node keeps it anyway)."""
        users = [n for n in readers if n in keeps_input]
        if not users:
            return
        if setup.full_finetune:
            if not shared:
                terms.append((what, width * c))
        elif setup.lora_layer == "fused":  # one autograd function keeps x (and its dropout mask)
            if not shared:
                terms.append((what, width * c))
            if setup.lora_dropout:
                terms.append((f"{what}: dropout masks ({len(users)})", len(users) * width * c))
        elif setup.lora_dropout:  # PEFT: each adapter keeps its own dropped copy and a bool mask
            terms.append((f"{what}: dropped copies and masks ({len(users)})", len(users) * width * (a + 1)))
        elif a != c:  # PEFT casts x to the adapter dtype in each adapter, which keeps its copy
            terms.append((f"{what}: {setup.adapter_dtype} copies ({len(users)})", len(users) * width * a))
        elif not shared:
            terms.append((what, width * c))

    def norm(what):
        terms.append((f"{what} norm input (float32) and statistics", h * _FLOAT32 + norm_stats))
        if setup.full_finetune and model.norm == "rmsnorm":  # ``weight * x_hat`` keeps x_hat for the weight's
            # gradient; a native LayerNorm recomputes x_hat from its saved statistics
            terms.append((f"{what} norm normalized input", h * c))

    norm("attention")
    mlp_readers = ["gate_proj", "up_proj"] if model.mlp == "gated" else ["up_proj"]
    if model.norms_per_layer == 1:  # parallel block: attention and MLP read one normalized tensor
        linear_inputs("attention and MLP input", h, ["q_proj", "k_proj", "v_proj"] + mlp_readers)
    else:
        linear_inputs("q/k/v input", h, ["q_proj", "k_proj", "v_proj"])
    if setup.attention == "sdpa":
        terms.append(("q, k, v after RoPE", (q_dim + 2 * kv_dim) * c))
        terms.append(("attention output and log-sum-exp", q_dim * c + model.num_heads * _FLOAT32))
        linear_inputs("o_proj input", q_dim, ["o_proj"], shared=True)  # the attention output, kept by SDPA
    else:
        terms.append(("q, and k, v repeated to all heads", 3 * q_dim * c))
        terms.append(("attention probabilities (float32 and compute dtype)", model.num_heads * s * (_FLOAT32 + c)))
        linear_inputs("o_proj input", q_dim, ["o_proj"])
    if model.norms_per_layer == 2:
        norm("MLP")
        linear_inputs("MLP input", h, mlp_readers)
    if model.mlp == "gated":
        terms.append(("gate output, activation, up output", 3 * i * c))
        linear_inputs("down_proj input (gate * up)", i, ["down_proj"])
    else:
        terms.append(("up_proj output (activation input)", i * c))
        linear_inputs("down_proj input (activation output)", i, ["down_proj"])
    if adapted and setup.lora_layer == "peft":  # a fused layer recomputes A x in its backward
        terms.append((f"LoRA A x ({len(adapted)} adapters)", len(adapted) * r * a))
    return terms


#: Phases of a training step, in order (Note: the peak of a training step).
PHASES = ("loss forward", "loss backward", "backward: top layer", "backward: bottom layer", "optimizer step")
_KEPT = ("loss forward", "loss backward", "backward: top layer", "backward: bottom layer")
_LAYERS = ("backward: top layer", "backward: bottom layer")


def activation_items(model, setup) -> list:
    """Activation and transient items of a fine-tuning step, with the phases each lives in.

    Returns
    -------
    list of (name, category, nbytes, note, phases)
        Category ``"activations"`` (kept from forward to backward) or ``"transient"`` (alive in
        one phase only); ``phases`` is a tuple of names from ``PHASES``.

    Notes
    -----
    Without checkpointing ``L * b * s * sum(layer terms)``, with it ``L * b * s * h * c`` plus
    one recomputed layer at a time; then the final norm's input, the RoPE tables, and the loss
    (see Note: activations kept for backward, and Note: the loss's memory).
    """
    c = INPUT_DTYPES[setup.compute_dtype].itemsize
    b, s = setup.batch_size, setup.seq_len
    tokens = b * s
    h = model.hidden_size
    layer_bytes = sum(nbytes for _, nbytes in layer_activation_terms(model, setup))  # per token
    items = []
    # Through the loss and the top layer's backward every layer's share is kept; when the bottom
    # layer's backward runs, the layers above have freed theirs.
    early = ("loss forward", "loss backward", "backward: top layer")
    upper = model.num_layers - 1
    if setup.gradient_checkpointing:
        items.append(("decoder layer inputs (checkpoints)", "activations", tokens * h * c,
                      "layer 0's, kept to the end", _KEPT))
        items.append(("decoder layer inputs (checkpoints), layers above 0", "activations", upper * tokens * h * c,
                      f"{upper} layers x {h} values", early))
    else:
        items.append(("decoder layer 0: tensors kept for backward", "activations", tokens * layer_bytes,
                      f"{layer_bytes} bytes per token", _KEPT))
        items.append(("decoder layers above 0: tensors kept for backward", "activations",
                      upper * tokens * layer_bytes, f"{upper} layers x {layer_bytes} bytes per token", early))
        # The embedding output is a leaf that requires grad (enable_input_require_grads): the
        # graph holds it to the end. With checkpointing it is layer 0's checkpoint, counted above.
        items.append(("embedding output (a leaf that requires grad)", "activations", tokens * h * c, "", _KEPT))
    final = h * _FLOAT32 + NORMS[model.norm][1] * _FLOAT32
    if setup.full_finetune:  # the gradients of the head (its input) and the embeddings (the ids)
        final += h * c + _INT64 + (h * c if model.norm == "rmsnorm" else 0)  # and the final norm's weight
    items.append(("final norm input", "activations", tokens * final, "float32", ("loss forward", "loss backward")))
    # One (1, s, head_dim) cos and sin for the whole batch; the int64 position ids are kept only
    # as an input of the checkpointed layers.
    rope = 2 * s * model.head_dim * c + (s * _INT64 if setup.gradient_checkpointing else 0)
    items.append(("RoPE cos/sin" + (", position ids" if setup.gradient_checkpointing else ""), "activations", rope, "",
                  _KEPT))
    items.append(("token batch (input ids, labels)", "activations", 2 * tokens * _INT64, "int64", PHASES))
    items += _loss_items(model, setup)

    recompute = tokens * layer_bytes if setup.gradient_checkpointing else 0
    scratch, grads = _layer_backward_bytes(model, setup)
    what = "one recomputed layer + " if recompute else ""
    items.append(("backward of the top layer: " + what + "scratch, its adapters' first gradients", "transient",
                  recompute + scratch + grads, "", ("backward: top layer",)))
    items.append(("backward of the bottom layer: " + what + "scratch, its adapters' first gradients", "transient",
                  recompute + scratch + (0 if setup.full_finetune else grads), "", ("backward: bottom layer",)))
    return items


def _layer_backward_bytes(model, setup) -> tuple:
    """Scratch of one decoder layer's backward at its fullest moment, and the gradients made by then.

    Note: the backward scratch
        Measured on CPU (``benchmarks/memory_measure.py``), a layer's backward is fullest at one
        of two moments. (1) The widest adapted linear layer (``down_proj``, the first reached)
        forms its input gradient from two branches while the gradient arriving from above
        (``T h c``) still exists; with ``fused`` layers: ``x`` cast to the adapter dtype, ``s G``,
        ``G B``, then ``G W``, ``(G B) A``, its cast back and the sum; with PEFT the adapter
        branch runs first and leaves its input gradient, then the base's backward decodes ``W``
        and forms ``G W``, and the two are summed. (2) The RMSNorm before the MLP runs its
        backward in float32 (transformers upcasts): five ``T h`` float32 tensors at once, by
        which time the MLP's own saved tensors are freed. The larger of the two counts; the
        final norm's backward is moment (2) with every layer's tensors still kept.

    Returns
    -------
    (int, int)
        Scratch bytes, and bytes of the adapter gradients that exist at that moment.
    """
    c = INPUT_DTYPES[setup.compute_dtype].itemsize
    a = INPUT_DTYPES[setup.adapter_dtype].itemsize
    tokens, r, h = setup.batch_size * setup.seq_len, setup.rank, model.hidden_size
    layers = model.linear_layers()
    adapted = set(setup.targets(model))
    grads = {n: r * (i + o) * a if n in adapted else 0 for n, (o, i) in layers.items()}
    linear_moment = (0, 0)
    for name, (out_f, in_f) in layers.items():
        dequantized = out_f * in_f * c if setup.quant_type is not None else 0
        if name not in adapted:
            scratch = tokens * in_f * c + dequantized  # G W
        elif setup.lora_layer == "fused":
            casts = tokens * in_f * (a + c) if a != c else 0
            scratch = tokens * (in_f * (c + a + c) + out_f * a + r * a) + casts
        else:
            scratch = max(tokens * in_f * (a + c) if a != c else 0, 2 * tokens * in_f * c + dequantized)
        linear_moment = max(linear_moment, (tokens * h * c + scratch, grads[name]))
    terms = layer_activation_terms(model, setup)
    names = [name for name, _ in terms]
    mlp_norm = next((k for k, name in enumerate(names) if name.startswith("MLP norm input")), None)
    if mlp_norm is None:  # a parallel block has one norm, reached last
        return linear_moment
    mlp_saved = tokens * sum(nbytes for _, nbytes in terms[mlp_norm + 1:])
    mlp_grads = sum(grads.get(n, 0) for n in ("gate_proj", "up_proj", "down_proj"))
    norm_moment = (_norm_backward_bytes(model, tokens) - mlp_saved, mlp_grads)
    return max(linear_moment, norm_moment, key=sum)


def _norm_backward_bytes(model, tokens: int) -> int:
    """Scratch of a norm's float32 backward (Note: the backward scratch): five ``T h`` float32 tensors."""
    return 5 * tokens * model.hidden_size * _FLOAT32


def _loss_items(model, setup) -> list:
    """The loss's tensors in the two loss phases.

    Note: the loss's memory
        transformers' ``ForCausalLMLoss`` upcasts the logits (``logits.float()``, a copy unless
        they are float32 already), pads the labels by one and takes a shifted contiguous copy,
        and ``cross_entropy`` keeps its float32 log-softmax: in the loss forward the compute-
        dtype logits, the float32 copy and the log-softmax exist at once. Its backward holds the
        log-softmax, the gradient of the loss and the gradient of the logits, three float32
        ``tokens x vocab`` tensors (measured: ``benchmarks/memory_measure.py``), then the final
        norm's float32 backward (Note: the backward scratch). A fused chunked cross-entropy
        (``loss_chunk_tokens``) makes the logits of one chunk at a time and their gradient in the
        forward pass, and keeps the gradient of the hidden states instead (from the algorithm;
        not measured here).
    """
    c = INPUT_DTYPES[setup.compute_dtype].itemsize
    b, s = setup.batch_size, setup.seq_len
    tokens, h, v = b * s, model.hidden_size, model.vocab_size
    labels = b * (s + 1) * _INT64 + tokens * _INT64  # padded by one, then the shifted copy
    if setup.loss_chunk_tokens is None:
        upcast = v * _FLOAT32 if c != _FLOAT32 else 0  # ``logits.float()`` copies unless already float32
        return [
            ("loss forward: logits, float32 logits, log-softmax, labels", "transient",
             tokens * (v * c + upcast + v * _FLOAT32) + labels,
             f"{setup.compute_dtype} logits + float32 copy + float32 log-softmax", ("loss forward",)),
            ("loss backward: log-softmax, its gradient, the logits' gradient; then the final norm's", "transient",
             max(3 * tokens * v * _FLOAT32, _norm_backward_bytes(model, tokens)),
             "three float32 (tokens x vocab) tensors, or five (tokens x hidden)", ("loss backward",)),
        ]
    chunk = min(setup.loss_chunk_tokens, tokens)
    return [
        ("loss forward (chunked): one chunk's logits and gradient, the hidden states' gradient", "transient",
         chunk * v * (c + 2 * _FLOAT32) + tokens * h * c + labels,
         f"{chunk} tokens at a time", ("loss forward",)),
        ("loss backward (chunked): the hidden states' gradient; the final norm's backward", "transient",
         max(tokens * h * c, _norm_backward_bytes(model, tokens)), "", ("loss backward",)),
    ]


def korthikanti_activation_bytes(model: ModelShape, *, batch_size: int, seq_len: int) -> int:
    """Korthikanti et al. 2022, section 4.1: activation bytes of all layers, ``L s b h (34 + 5 a s / h)``.

    For a GPT layer trained in 16-bit with dropout, no tensor or sequence parallelism, no
    recomputation. Given for comparison with ``estimate_memory`` (see Note: activations kept
    for backward).

    Examples
    --------
    >>> from qlora_ref.memory.shapes import ModelShape
    >>> gpt = ModelShape("gpt", hidden_size=1024, intermediate_size=4096, num_layers=1, num_heads=16,
    ...                  num_kv_heads=16, vocab_size=50257, mlp="plain", norm="layernorm")
    >>> korthikanti_activation_bytes(gpt, batch_size=1, seq_len=1024)
    119537664
    """
    s, b, h, a = seq_len, batch_size, model.hidden_size, model.num_heads
    return model.num_layers * (34 * s * b * h + 5 * a * s * s * b)
