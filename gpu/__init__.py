"""qlora_gpu: the fast path of qlora-ref, in PyTorch with Triton kernels on CUDA.

Installed from the folder ``gpu/`` under the import name ``qlora_gpu``. Every public function
mirrors a function of the oracle ``qlora_ref`` by name and signature, on torch tensors, and is
checked against it by property tests.
"""
