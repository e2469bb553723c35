"""One QLoRA layer's forward and backward, against plain LoRA on a dense base and full fine-tuning.

Checked first: output and gradients against the oracle's ``qlora_forward`` / ``qlora_backward``
(``lora_forward`` / ``lora_backward`` for the dense baselines), derived tier. FLOPs:
``4 T N K + 6 T r (K + N)`` (``6 T N K`` for full fine-tuning); the percentage is of the matmul
ceiling measured in the same run.
"""

import pytest

from benchmarks import cases


@pytest.mark.parametrize("provider", cases.PROVIDERS["layer"])
def test_layer(run_case, workspace, shape_key, tokens, provider):
    run_case(cases.make_layer(workspace, provider, shape_key, tokens))
