"""What the connection costs the training process, by `linger`.

    python benchmarks/transport_cpu.py [--steps 400] [--interval 0.02] [--layers 8] [--rounds 2]

Starts `gradguard serve --no-store` here, then for each linger (0, the old
one message per step, first: the baseline) streams `--steps` summaries of
`--layers` layers through the client's own outbox and gRPC connection, one
every `--interval` seconds, as a training loop would, and reads this
process's CPU time (all threads: gRPC's and the connection's) from
`getrusage`. Prints CPU per step, less a loop that only sleeps, and the ratio
to linger 0 in the same run. Rounds alternate the lingers so drift lands on
all alike.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import start_server

from gradguard._transport import GrpcConnection, Outbox, TransportStats
from gradguard.v1 import gradguard_pb2 as pb


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def idle(steps: int, interval: float) -> float:
    """CPU per step of a loop that only sleeps."""
    c = cpu()
    for _ in range(steps):
        time.sleep(interval)
    return (cpu() - c) / steps


def stream(addr: str, linger: float, steps: int, interval: float, layers: int) -> tuple[float, TransportStats]:
    stats = TransportStats()
    outbox = Outbox(4096, stats, linger=linger)
    names = [f"layer{i}" for i in range(layers)]
    hello = pb.Hello(
        job=f"transport-{linger}-{time.time_ns()}", world_size=1, layer_names=names, client_version="bench"
    )
    conn = GrpcConnection(addr, hello, outbox, stats, lambda advice: None)
    conn.start()
    deadline = time.monotonic() + 30
    while not stats.connected:
        if time.monotonic() > deadline:
            sys.exit(f"no Welcome from {addr}")
        time.sleep(0.01)
    c = cpu()
    for step in range(1, steps + 1):
        summary = pb.Summary(step=step, time=time.time(), grad_norm=1.0, loss=2.0, lr=1e-3, layer_l2=[0.3] * layers)
        outbox.put_summary(summary)
        time.sleep(interval)
    used = (cpu() - c) / steps
    conn.stop(5.0)
    if stats.sent != steps:
        sys.exit(f"linger {linger}: sent {stats.sent} of {steps} summaries")
    return used, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--interval", type=float, default=0.02, help="seconds between steps")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lingers", default="0,0.1,0.25", help="comma-separated seconds; the first is the baseline")
    args = ap.parse_args()
    lingers = [float(x) for x in args.lingers.split(",")]

    server, addr = start_server("--no-store")
    used: dict[float, list[float]] = {x: [] for x in lingers}
    messages: dict[float, int] = {}
    try:
        base = idle(args.steps, args.interval)
        for _ in range(args.rounds):
            for linger in lingers:
                ms, stats = stream(addr, linger, args.steps, args.interval, args.layers)
                used[linger].append(ms - base)
                messages[linger] = stats.messages
    finally:
        server.terminate()
        server.wait()

    print(
        f"{args.steps} steps of {args.layers} layers, one every {args.interval * 1e3:.0f} ms, {args.rounds} rounds; "
        f"a loop that only sleeps: {base * 1e3:.3f} ms CPU per step (taken off below)"
    )
    baseline = statistics.median(used[lingers[0]])
    for linger in lingers:
        ms = statistics.median(used[linger])
        print(
            f"linger {linger:5.2f} s: {ms * 1e3:.3f} ms CPU per step, {messages[linger]} messages "
            f"({args.steps / messages[linger]:.1f} steps each), {ms / baseline:.2f}x linger {lingers[0]:g}"
        )


if __name__ == "__main__":
    main()
