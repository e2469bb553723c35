"""QLoRA on two processes with FSDP2: the CPU (gloo) version of a multi-GPU run.

Run it as ``python docs/examples/fsdp_qlora.py --out DIR``: it spawns two ranks, shards a small
model whose linear layers are ``QLoRALinear`` (NF4, double quantization), trains the adapters
for three steps with each rank on half of the batch, prints what each rank holds, and writes a
sharded checkpoint (``DIR/dcp``) and a whole one (``DIR/model.safetensors`` in bitsandbytes'
layout, ``DIR/adapter`` a PEFT adapter folder).

On GPUs the same code runs with the NCCL backend: ``backend="nccl"``,
``torch.cuda.set_device(rank)`` and ``build().to("cuda")`` (or launch with ``torchrun`` and
read the rank from the environment).
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from qlora_gpu import replace_linear_with_qlora
from qlora_gpu.fsdp import full_state_dict, rank_nbytes
from qlora_gpu.model import save_peft_adapter

WORLD_SIZE = 2
VOCAB, WIDTH, LAYERS = 256, 128, 2


class Block(nn.Module):
    """A pre-norm MLP block: ``x + down(gelu(up(norm(x))))``."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up_proj = nn.Linear(d, 4 * d)
        self.down_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down_proj(F.gelu(self.up_proj(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(Block(WIDTH) for _ in range(LAYERS))
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids, targets):
        """Mean next-token cross-entropy; ids and targets (batch, seq)."""
        x = self.embed(ids)  # (batch, seq, width)
        for layer in self.layers:
            x = layer(x)
        logits = self.head(x)  # (batch, seq, vocab)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def build() -> TinyLM:
    """The same model on every rank: same seed, then the up/down projections become QLoRA layers."""
    torch.manual_seed(0)
    model = TinyLM()
    replace_linear_with_qlora(model, ["up_proj", "down_proj"], r=8, alpha=16, compute_dtype=torch.bfloat16)
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, 33), generator=torch.Generator().manual_seed(1))  # (batch, seq + 1)


def train(rank: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    model = build()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.layers:  # one all-gather per block, then the root (embedding, head)
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    held = rank_nbytes(model)
    print(f"rank {rank} holds: packed {held.packed} B, absmax codes {held.absmax_codes} B, "
          f"adapters {held.adapters} B, constants {held.constants} B, other {held.other} B", flush=True)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens()[rank::WORLD_SIZE]  # this rank's half of the batch
    for step in range(3):
        loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()  # FSDP averages the adapters' gradients over the ranks
        optimizer.step()
        optimizer.zero_grad()
        print(f"rank {rank} step {step}: loss {loss.item():.4f}", flush=True)

    dcp.save(model.state_dict(), checkpoint_id=Path(out) / "dcp")  # each rank writes its shards
    full = full_state_dict(model)  # gathered onto rank 0
    if rank == 0:
        save_file({k: v for k, v in full.items() if ".lora_" not in k}, str(Path(out) / "model.safetensors"))
        save_peft_adapter(model, Path(out) / "adapter", state_dict=full)
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the checkpoints")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    mp.spawn(train, args=(args.out, free_port()), nprocs=WORLD_SIZE, join=True)
