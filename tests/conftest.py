"""Shared pytest set-up: hypothesis profiles and the Triton interpreter on CPU-only machines.

Profiles: ``default`` (fast, what CI runs) and ``thorough`` (many more examples); choose with
``HYPOTHESIS_PROFILE=thorough pytest``.
"""

import os

# Triton kernels run in Triton's interpreter when there is no GPU; this must be set before
# triton is first imported anywhere.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # One intra-op thread: the tests use small shapes, where OpenMP threads only add overhead,
    # and on a loaded 2-core machine spinning threads make a tiny matmul 100x slower.
    torch.set_num_threads(1)
except ImportError:  # the oracle's tests run without torch
    pass

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
