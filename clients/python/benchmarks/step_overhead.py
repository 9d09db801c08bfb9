"""What the client costs per training step, against what people do today.

    python benchmarks/step_overhead.py [--steps 40] [--rounds 5] [--threads N] [--device cuda]

One model (an MLP of a few million parameters, batch 256, on the CPU unless
`--device cuda`; GPU steps are timed to completion), five loops taking
steps in turn so that machine noise hits them alike:

- plain:   forward, backward, optimizer.step
- clip:    plus clip_grad_norm_(params, 1.0), the common practice
- naive:   plus a per-parameter torch.norm compared with a threshold, as blog
           posts show (each comparison is a host sync)
- gradguard: gradguard.watch(..., mode="enforce", max_norm=1.0) replacing the
           clip, streaming to a real `gradguard serve` started here
- lockstep: the same with max_lag=0: each step waits for the service's
           decision on it (one round trip)

Prints each loop's median step time and the ratios the client is held to:
gradguard/clip (target <= 1.02) and gradguard/naive (target < 1), and what
lock-step costs on top (lockstep - gradguard, per step).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import gradguard

ROOT = Path(__file__).resolve().parents[3]


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    widths = [512, 1024, 1024, 1024, 512, 10]
    layers: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
    return torch.nn.Sequential(*layers[:-1])


def server_bin() -> str:
    if os.environ.get("GRADGUARD_BIN"):
        return os.environ["GRADGUARD_BIN"]
    for build in ("release", "debug"):
        path = ROOT / "target" / build / "gradguard"
        if path.exists():
            return str(path)
    sys.exit("no gradguard binary: cargo build --release (or set GRADGUARD_BIN)")


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Loop:
    def __init__(self, name: str, x: torch.Tensor, y: torch.Tensor):
        self.name = name
        self.model = model().to(x.device)
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.x, self.y = x, y
        self.times: list[float] = []
        self.guard = None

    def step(self) -> None:
        sync()
        t = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        if self.name == "clip":
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        elif self.name == "naive":
            for i, p in enumerate(self.params):
                norm = torch.norm(p.grad)
                if norm > 1e6:  # a host sync per parameter
                    print(f"step: gradient norm of parameter {i} is {norm}")
        elif self.guard is not None and not self.guard.step(loss):
            sync()
            self.times.append(time.perf_counter() - t)
            return
        self.opt.step()
        sync()
        self.times.append(time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="steps per loop per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    data = tempfile.mkdtemp(prefix="gradguard-bench-")
    # The service normally runs on another machine; here it shares the CPU,
    # so it runs at the lowest priority, taking only what the job leaves.
    server = subprocess.Popen(
        [
            "nice",
            "-n",
            "19",
            server_bin(),
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--data-dir",
            data,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    addr = server.stdout.readline().split("grpc=")[1].split()[0]
    try:
        # A learnable task (labels from a fixed random teacher), so that a
        # healthy run gets no advice and the loops do the same work.
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, 512, generator=gen)
        y = (x @ torch.randn(512, 10, generator=gen)).argmax(1)
        x, y = x.to(args.device), y.to(args.device)
        loops = [Loop(n, x, y) for n in ("plain", "clip", "naive", "gradguard", "lockstep")]
        guarded, lockstep = loops[-2:]
        guarded.guard = gradguard.watch(guarded.model, guarded.opt, job="bench", server=addr, max_norm=1.0)
        lockstep.guard = gradguard.watch(
            lockstep.model, lockstep.opt, job="bench-lockstep", server=addr, max_norm=1.0, max_lag=0
        )
        for loop in loops:  # warm-up, not counted
            for _ in range(5):
                loop.step()
            loop.times.clear()
        # Step by step in turn, so that drift in the machine's speed (shared,
        # noisy) lands on every loop alike.
        for _ in range(args.rounds * args.steps):
            for loop in loops:
                loop.step()
        stats = guarded.guard.stats
        lock_stats = lockstep.guard.stats
        guarded.guard.close()
        lockstep.guard.close()
    finally:
        server.terminate()
        server.wait()

    params = sum(p.numel() for p in loops[0].params)
    print(
        f"model: MLP, {params / 1e6:.1f} M parameters, batch {args.batch}, AdamW, torch {torch.__version__}, "
        f"{args.device}, {args.threads} thread(s); {args.rounds} rounds x {args.steps} steps per loop"
    )
    median = {loop.name: statistics.median(loop.times) * 1e3 for loop in loops}
    for name, ms in median.items():
        print(f"{name:>10}: median {ms:7.2f} ms/step   ({ms / median['plain']:.3f}x plain)")
    print(
        f"gradguard sent {stats.sent} summaries, dropped {stats.dropped}; advice received {stats.advice_received}; "
        f"clipped {stats.clipped} of {stats.steps} steps at {stats.clip_norm}"
    )
    print(f"ratio gradguard/clip: {median['gradguard'] / median['clip']:.3f} (target <= 1.02)")
    print(f"ratio gradguard/naive: {median['gradguard'] / median['naive']:.3f} (target < 1)")
    print(
        f"lock-step (max_lag=0) costs {median['lockstep'] - median['gradguard']:+.3f} ms/step "
        f"({median['lockstep'] / median['gradguard']:.3f}x gradguard); lag timeouts {lock_stats.lag_timeouts}"
    )


if __name__ == "__main__":
    main()
