"""Conformance: other implementations checked against the oracle, every difference named.

- ``providers``: the registry of implementations (the oracle, plug-ins such as ``qlora_gpu``, and
  the comparators bitsandbytes and torchao) behind one protocol;
- ``implementations``: what ``qlora-ref check`` accepts on its command line, in one interface;
- ``vector_cases`` and ``vectors``: the golden vectors (their data in ``vectors/`` beside them);
- ``compare``: one implementation's output against the oracle's, per array;
- ``classify``: the named rules that explain a difference;
- ``run``: the whole check and its report.
"""
