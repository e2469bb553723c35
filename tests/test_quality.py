"""Smoke run of the quality experiment at its tiny size: the plumbing, not the conclusions.

Every arm trains, the loss falls, adapters are the only trainable parameters in the adapter arms,
and the 4-bit base weights are bit-identical before and after fine-tuning.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the quality experiment needs torch")
quality = pytest.importorskip("benchmarks.quality")


@pytest.fixture(scope="module")
def tiny():
    cfg = quality.SIZES["tiny"]
    corpora = quality.load_corpora(max_pretrain_bytes=200_000)
    pretrained, losses = quality.pretrain(cfg, corpora)
    return cfg, corpora, pretrained, losses


def test_corpora_are_local_text():
    corpora = quality.load_corpora(max_pretrain_bytes=100_000)
    assert corpora["pretrain"].numel() >= 100_000
    assert corpora["finetune"].numel() > 100_000 and corpora["heldout"].numel() > 10_000
    assert b"def " in bytes(corpora["pretrain"][:20_000].tolist())  # Python source
    assert b"the " in bytes(corpora["heldout"].tolist())  # English prose


def test_pretraining_loss_falls(tiny):
    _, _, _, losses = tiny
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, f"pretraining loss {losses[0]:.3f} -> {losses[-5:]}"


@pytest.mark.parametrize("arm", [a for a in quality.ARMS if a != "base"])
def test_arm_trains(tiny, arm):
    cfg, corpora, pretrained, _ = tiny
    torch.manual_seed(0)
    model = quality.build_arm(arm, pretrained, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if arm == "full":
        assert trainable == {n for n, _ in model.named_parameters()}
    else:
        assert trainable and all("lora_" in n for n in trainable), f"non-adapter trainable: {trainable}"
    frozen_before = {n: b.clone() for n, b in model.named_buffers()}
    frozen_before.update({n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad})
    heldout = quality.eval_batches(corpora["heldout"], cfg.eval_batches, cfg.batch_size, cfg.seq_len)
    curve, train_losses = quality._train(model, corpora["finetune"], cfg, steps=cfg.finetune_steps,
                                         lr=cfg.lr, seed=0, eval_set=heldout)
    assert curve[-1][1] < curve[0][1], f"{arm}: held-out loss did not fall: {curve}"
    after = dict(model.named_buffers())
    after.update({n: p.detach() for n, p in model.named_parameters() if not p.requires_grad})
    for name, before in frozen_before.items():
        assert torch.equal(before.view(torch.uint8) if before.dtype == torch.bfloat16 else before, 
                           after[name].view(torch.uint8) if after[name].dtype == torch.bfloat16 else after[name]), (
            f"{arm}: frozen tensor {name} changed during fine-tuning")


def test_run_experiment_tiny():
    results = quality.run_experiment("tiny", arms=("base", "nf4-dq"), progress=None)
    assert set(results["arms"]) == {"base", "nf4-dq"}
    nf4 = results["arms"]["nf4-dq"]
    assert nf4["base_weight_error"] > 0 and nf4["trainable_parameters"] > 0
    assert results["arms"]["base"]["trainable_parameters"] == 0


def test_unknown_arm_and_size():
    with pytest.raises(ValueError, match="unknown arms"):
        quality.run_experiment("tiny", arms=("nf5",), progress=None)
    with pytest.raises(ValueError, match="unknown size"):
        quality.run_experiment("huge", progress=None)
