"""The files 4-bit models live in: bitsandbytes state dicts, safetensors checkpoints, PEFT adapters.

``qlora_ref.formats.bnb`` writes and reads one layer's bitsandbytes state-dict entries (the one
list of their keys), ``qlora_ref.formats.checkpoint`` a transformers + bitsandbytes safetensors
checkpoint, and ``qlora_ref.formats.peft`` a PEFT adapter folder. NumPy only; the layout is
documented in ``docs/formats.md``.
"""
