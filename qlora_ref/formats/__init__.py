"""The files 4-bit models live in: bitsandbytes state dicts, safetensors checkpoints, PEFT adapters.

``qlora_ref.formats.bnb`` writes and reads one layer's bitsandbytes state-dict entries (the one
list of their keys), ``qlora_ref.formats.checkpoint`` a transformers + bitsandbytes safetensors
checkpoint, and ``qlora_ref.formats.peft`` a PEFT adapter folder; ``qlora_ref.formats.safe_io``
holds what every reader of a user's files shares (bounded JSON, paths confined to a folder, writes
through a temporary file). NumPy only; the layout is documented in ``docs/spec.md`` and what
the readers promise in ``docs/reader.md``.
"""
