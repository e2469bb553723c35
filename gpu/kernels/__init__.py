"""The Triton kernels of ``qlora_gpu``: quantize, decode and the 4-bit matrix product.

Each module holds its kernels (names end in ``_kernel``), their launcher and the bytes-moved
formula the benchmarks use; ``qlora_gpu.kernels.util`` holds what they share. They run on CUDA,
or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``). Triton is an optional
dependency: ``qlora_gpu.quantize`` and ``qlora_gpu.matmul`` import these modules only when the
``"triton"`` backend is asked for.
"""
