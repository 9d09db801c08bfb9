"""What the client costs per training step, against what people do today.

    python benchmarks/step_overhead.py [--steps 60] [--rounds 5] [--threads 1]

One model (an MLP of a few million parameters, batch 256, on the CPU unless
`--device cuda`; GPU steps are timed to completion), four loops
interleaved round by round so that machine noise hits them alike:

- plain:   forward, backward, optimizer.step
- clip:    plus clip_grad_norm_(params, 1.0), the common practice
- naive:   plus a per-parameter torch.norm compared with a threshold, as blog
           posts show (each comparison is a host sync)
- gradguard: gradguard.watch(..., mode="enforce", max_norm=1.0) replacing the
           clip, streaming to a real `gradguard serve` started here

Prints each loop's median step time and the ratios the client is held to:
gradguard/clip (target <= 1.02) and gradguard/naive (target < 1).
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
        elif self.name == "gradguard" and not self.guard.step(loss):
            sync()
            self.times.append(time.perf_counter() - t)
            return
        self.opt.step()
        sync()
        self.times.append(time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="steps per loop per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 leaves a core to the server)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    data = tempfile.mkdtemp(prefix="gradguard-bench-")
    server = subprocess.Popen(
        [server_bin(), "serve", "--grpc-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--data-dir", data],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    addr = server.stdout.readline().split("grpc=")[1].split()[0]
    try:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, 512, generator=gen).to(args.device)
        y = torch.randint(0, 10, (args.batch,), generator=gen).to(args.device)
        loops = [Loop(n, x, y) for n in ("plain", "clip", "naive", "gradguard")]
        guarded = loops[-1]
        guarded.guard = gradguard.watch(guarded.model, guarded.opt, job="bench", server=addr, max_norm=1.0)
        for loop in loops:  # warm-up, not counted
            for _ in range(5):
                loop.step()
            loop.times.clear()
        for _ in range(args.rounds):
            for loop in loops:
                for _ in range(args.steps):
                    loop.step()
        stats = guarded.guard.stats
        guarded.guard.close()
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
    print(f"gradguard sent {stats.sent} summaries, dropped {stats.dropped}, connected {stats.connected}")
    print(f"ratio gradguard/clip: {median['gradguard'] / median['clip']:.3f} (target <= 1.02)")
    print(f"ratio gradguard/naive: {median['gradguard'] / median['naive']:.3f} (target < 1)")


if __name__ == "__main__":
    main()
