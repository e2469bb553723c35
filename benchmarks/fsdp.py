"""FSDP2 QLoRA training step: step time and peak memory per rank, for a model size and world size.

``python -m benchmarks.fsdp --out DIR [--model llama-2-70b] [--layers 2] [--world-size N]``
spawns one process per GPU (NCCL), builds the model's shapes (``qlora_ref.memory`` model list)
with ``--layers`` decoder layers, replaces all seven projections of each layer by
``QLoRALinear`` (NF4, double quantization, block 64, bfloat16 compute, r = 16), shards each
layer and the root with ``fully_shard`` and a bfloat16 / float32 mixed-precision policy, and
times AdamW steps (forward, backward, optimizer step) with CUDA events after warm-up; median
with 20%/80% quantiles. ``--device cpu`` runs the same on gloo as a dry run (for testing the
script, not a benchmark; ``--model tiny`` keeps it small).

Check, then time: before any timing, every rank runs one step on the same batch; the losses of
all ranks must be equal bit for bit (each rank decodes the same gathered bytes), and each rank
must hold ``1 / world_size`` of the packed bytes. A failed check is recorded and nothing is
timed.

Written to ``DIR/fsdp-<date>.json``: ``{"schema": 1, "kind": "fsdp", "date", "machine",
"versions", "options", "check", "ranks": [...]}``, one entry per rank with ``time_s`` (median,
q20, q80, n), ``tokens_per_s`` (``world_size * batch * seq_len / median``, the whole step),
``peak_allocated_bytes`` (``torch.cuda.max_memory_allocated`` over the timed steps; None on CPU)
and ``held_bytes`` (``qlora_gpu.fsdp.rank_nbytes``: the local shards by kind).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

TINY = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=128)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fsdp", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the results JSON")
    p.add_argument("--model", default="llama-2-70b", help="a name of qlora-ref memory's model list, or 'tiny'")
    p.add_argument("--layers", type=int, default=2, help="decoder layers to build (default 2)")
    p.add_argument("--world-size", type=int, default=0, help="ranks (default: every visible GPU; 2 on CPU)")
    p.add_argument("--batch", type=int, default=1, help="sequences per rank")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (alpha = 2r)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a gloo dry run")
    args = p.parse_args(argv)
    for name in ("layers", "batch", "seq_len", "rank", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.world_size < 0:
        p.error("--world-size must be >= 1 (or 0: every visible GPU)")
    if args.device not in ("cuda", "cpu"):
        p.error(f"--device must be cuda or cpu, got {args.device!r}")
    if args.model != "tiny":
        from qlora_ref.memory.shapes import model_shape

        try:
            model_shape(args.model)
        except (KeyError, ValueError) as exc:
            p.error(str(exc).strip("'\""))
    return args


def build_model(args, device):
    """The benchmark's model on ``device``: the named shapes, ``args.layers`` layers, QLoRA layers."""
    import torch
    import transformers

    from qlora_gpu import replace_linear_with_qlora
    from qlora_ref.memory.shapes import model_shape

    shape = TINY if args.model == "tiny" else vars(model_shape(args.model))
    config = transformers.LlamaConfig(hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                                      num_hidden_layers=args.layers, num_attention_heads=shape["num_heads"],
                                      num_key_value_heads=shape["num_kv_heads"], vocab_size=shape["vocab_size"],
                                      max_position_embeddings=max(args.seq_len, 64))
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    replace_linear_with_qlora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                              r=args.rank, alpha=2 * args.rank, compute_dtype=torch.bfloat16)
    return model


def _rank_main(rank: int, args, port: int, world_size: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from qlora_gpu.fsdp import rank_nbytes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    model = build_model(args, device)
    whole_packed = rank_nbytes(model).packed
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    held = rank_nbytes(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    # Check: the same batch on every rank gives the same loss bits; the packed bytes are split.
    same = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    loss = step(same).to(torch.float32).reshape(1)
    losses = [torch.empty_like(loss) for _ in range(world_size)]
    dist.all_gather(losses, loss)
    bits = {int(t.view(torch.int32).item()) for t in losses}
    check = {"same_batch_losses_equal": len(bits) == 1, "losses": [t.item() for t in losses],
             "packed_bytes_whole": whole_packed, "packed_bytes_held": held.packed,
             "held_is_one_over_world_size": held.packed * world_size == whole_packed}
    record = {"rank": rank, "held_bytes": {**vars(held), "total": held.total}, "check": check}
    if all(v for k, v in check.items() if isinstance(v, bool)):
        ids = torch.randint(0, vocab, (args.batch, args.seq_len),
                            generator=torch.Generator().manual_seed(1 + rank)).to(device)  # data parallel
        for _ in range(2):
            step(ids)
        times = []
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.steps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(ids)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                step(ids)
                times.append(time.perf_counter() - t0)
        q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
        median = statistics.median(times)
        record.update(time_s={"median": median, "q20": q[0], "q80": q[3], "n": len(times)},
                      tokens_per_s=world_size * args.batch * args.seq_len / median,
                      peak_allocated_bytes=int(torch.cuda.max_memory_allocated()) if cuda else None)
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    import tempfile

    import torch
    import torch.multiprocessing as mp

    from benchmarks.results import environment

    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.fsdp: needs CUDA GPUs (torch.cuda.is_available() is False); `--device cpu` is a dry run",
              file=sys.stderr)
        return 2
    world_size = args.world_size or (torch.cuda.device_count() if args.device == "cuda" else 2)
    if args.device == "cuda" and world_size > torch.cuda.device_count():
        print(f"benchmarks.fsdp: --world-size {world_size} but {torch.cuda.device_count()} GPU(s)", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:  # before any work: a results folder that cannot be written is a one-line error
        out.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkstemp(dir=out)[1]).unlink()
    except OSError as exc:
        print(f"benchmarks.fsdp: error: cannot write to --out {out}: {exc.strerror}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(args, _free_port(), world_size, tmp), nprocs=world_size, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world_size)]
    doc = {"schema": 1, "kind": "fsdp", **environment("cuda:0" if args.device == "cuda" else "cpu"),
           "options": {**vars(args), "world_size": world_size}, "ranks": ranks,
           "check": all(all(v for v in r["check"].values() if isinstance(v, bool)) for r in ranks),
           "wall_s": time.perf_counter() - start}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = out / f"fsdp-{stamp}.json"
    path.write_text(json.dumps(doc, indent=1))
    for r in ranks:
        t = r.get("time_s")
        timing = (f"step {t['median'] * 1e3:.1f} ms (q20 {t['q20'] * 1e3:.1f}, q80 {t['q80'] * 1e3:.1f}), "
                  f"{r['tokens_per_s']:.0f} tokens/s" if t else "not timed (check failed)")
        peak = r.get("peak_allocated_bytes")
        print(f"rank {r['rank']}: {timing}; holds {r['held_bytes']['total'] / 2**20:.1f} MiB "
              f"(packed {r['held_bytes']['packed'] / 2**20:.1f} MiB)"
              + (f"; peak allocated {peak / 2**30:.2f} GiB" if peak is not None else ""))
    print(f"results: {path}")
    return 0 if doc["check"] else 1


if __name__ == "__main__":
    sys.exit(main())
