"""What the client costs per training step under FSDP2, against clip_grad_norm_.

    python benchmarks/fsdp2_overhead.py [--model mlp|transformer] [--steps 40] [--rounds 5] [--block 10]
                                        [--loops plain,clip,gradguard] [--batch B] [--linger S]

Two processes (gloo on the CPU, one intra-op thread each) train the model of
step_overhead.py sharded with FSDP2 (`fully_shard` on each linear layer or
decoder block, then on the root), each rank on its half of the batch, AdamW.
The loops take turns of `--block` steps back to back, the order rotating from
turn to turn, so that the machine's drift lands on all alike:

- plain:     forward, backward, optimizer.step
- clip:      plus torch.nn.utils.clip_grad_norm_(params, 1.0), which on
             DTensor gradients reduces the norm across the ranks itself
- gradguard: gradguard.watch(..., max_norm=1.0) replacing the clip: the
             model's norms from one all_reduce of per-layer sums of squares
             (see _sharded.py), streamed to a real `gradguard serve`
             started here (nice 19: it normally runs elsewhere)

A step's time is the slower rank's (the ranks wait for each other in the
collectives anyway). Prints each loop's median step, gradguard/clip as the
ratio of the medians, paired by turn (median of the turns' ratios, bootstrap
95% interval) and paired step by step, and what each loop adds to the step
(from the end of backward to optimizer.step: the clip or guard.step).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_overhead
from step_overhead import Transformer, model, process_cpu, start_server, task

import gradguard

LOOPS = ("plain", "clip", "gradguard")
WORLD = 2


def sharded(kind: str) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    net = model(kind)  # seeded: every loop and rank starts from the same weights
    units = net.blocks.layers if isinstance(net, Transformer) else [m for m in net if isinstance(m, torch.nn.Linear)]
    for unit in units:
        fully_shard(unit)
    fully_shard(net)
    return net


class Loop(step_overhead.Loop):
    """step_overhead's loop on the sharded model (its `naive` loop is not run here)."""

    def make_model(self, kind: str, device: torch.device) -> torch.nn.Module:
        return sharded(kind)


def worker(rank: int, port: int, addr: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        x, y = task(args.model, args.batch)
        x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        loops = [Loop(name, args.model, x, y) for name in args.loops]
        for loop in loops:
            if loop.name == "gradguard":
                options = {} if args.linger is None else {"linger": args.linger}
                loop.guard = gradguard.watch(
                    loop.model, loop.opt, job="bench-fsdp2", server=addr, max_norm=1.0, **options
                )
                assert loop.guard.layers.sharding is not None, "the client did not see the FSDP2 shards"
        step_overhead.warm_up(loops)
        step_overhead.take_turns(loops, args.rounds * args.steps, args.block)
        stats = {}
        for loop in loops:
            if loop.guard is not None:
                stats[loop.name] = loop.guard.stats
                loop.guard.close()
        mine = {
            "times": {loop.name: loop.times for loop in loops},
            "block": {loop.name: loop.block for loop in loops},
            "stats": {k: vars(v) for k, v in stats.items()},
            "params": sum(p.numel() for p in loops[0].params),  # a DTensor's numel is the whole parameter's
            "tensors": len(loops[0].params),
        }
        everyone: list[dict | None] = [None] * WORLD
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            torch.save(everyone, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("mlp", "transformer"), default="mlp")
    ap.add_argument("--steps", type=int, default=40, help="steps per loop per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=10, help="steps a loop takes back to back in its turn")
    ap.add_argument("--linger", type=float, help="the gradguard loop's linger (default: the client's)")
    ap.add_argument("--loops", type=lambda v: v.split(","), default=LOOPS, help="default: plain,clip,gradguard")
    ap.add_argument("--batch", type=int, help="the whole batch, split over the ranks: 256 (mlp), 8 sequences")
    args = ap.parse_args()
    if unknown := set(args.loops) - set(LOOPS):
        ap.error(f"--loops: unknown {', '.join(sorted(unknown))} (known: {', '.join(LOOPS)})")
    if args.batch is None:
        args.batch = 8 if args.model == "transformer" else 256

    server, addr = start_server(nice=True)
    out = os.path.join(tempfile.mkdtemp(prefix="gradguard-fsdp2-"), "ranks.pt")
    env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # OpenMP's spinning threads take the other rank's core
    try:
        server_cpu = process_cpu(server.pid)
        mp.spawn(worker, args=(free_port(), addr, args, out), nprocs=WORLD)
        server_cpu = process_cpu(server.pid) - server_cpu
    finally:
        if env is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env
        server.terminate()
        server.wait()
    report(args, torch.load(out), server_cpu)


def report(args: argparse.Namespace, ranks: list[dict], server_cpu: float) -> None:
    names = list(args.loops)
    # A step takes as long as its slower rank.
    times = {n: [max(ts) for ts in zip(*(r["times"][n] for r in ranks))] for n in names}
    block = {n: [max(ts) for ts in zip(*(r["block"][n] for r in ranks))] for n in names}
    print(
        f"model: {args.model}, FSDP2 over {WORLD} processes (gloo, CPU, 1 thread each), "
        f"{ranks[0]['params'] / 1e6:.1f} M parameters in {ranks[0]['tensors']} tensors, "
        f"batch {args.batch} ({args.batch // WORLD} per rank), AdamW, torch {torch.__version__}; "
        f"{args.rounds} rounds x {args.steps} steps per loop, in turns of {args.block}"
    )
    median = {n: statistics.median(times[n]) * 1e3 for n in names}
    first = names[0]
    for n, ms in median.items():
        print(f"{n:>10}: median {ms:7.2f} ms/step   ({ms / median[first]:.3f}x {first})")
    for r, rank in enumerate(ranks):
        for n, st in rank["stats"].items():
            print(
                f"rank {r} {n}: sent {st['sent']} summaries in {st['messages']} messages, dropped {st['dropped']}; "
                f"advice received {st['advice_received']}; clipped {st['clipped']} of {st['steps']} steps"
            )
    summaries = sum(st["sent"] for rank in ranks for st in rank["stats"].values())
    if summaries:
        print(f"the service (nice 19, same CPUs) used {server_cpu / summaries * 1e3:.3f} ms of CPU per summary")

    for a, b in (("gradguard", "clip"), ("clip", "plain"), ("gradguard", "plain")):
        if a in median and b in median:
            step_by_step = statistics.median(x / y for x, y in zip(times[a], times[b]))
            print(
                f"{a}/{b}: medians {median[a] / median[b]:.3f}, paired by turn {step_overhead.paired_by_turn(times[a], times[b], args.block)}, "
                f"step by step {step_by_step:.3f}"
            )
    added = {n: statistics.median(block[n]) * 1e3 for n in names if n != "plain"}
    if added:
        print(
            "added to the step (median, between backward and optimizer.step): "
            + ", ".join(f"{n} {ms:.3f} ms" for n, ms in added.items())
            + (
                f"; gradguard/clip {added['gradguard'] / added['clip']:.3f}"
                if {"gradguard", "clip"} <= added.keys()
                else ""
            )
        )


if __name__ == "__main__":
    main()
