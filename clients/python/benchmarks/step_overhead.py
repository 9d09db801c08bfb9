"""What the client costs per training step, against what people do today.

    python benchmarks/step_overhead.py [--model mlp|transformer] [--steps 40] [--rounds 5] [--block 10]
                                       [--loops plain,clip,naive,gradguard] [--linger S] [--threads N]
                                       [--device cuda]

One model of a few million parameters, on the CPU unless `--device cuda` (GPU
steps are timed to completion): `mlp`, 6 linear layers (12 parameter tensors)
at batch 256; or `transformer`, a 12-layer pre-norm decoder (d=128, 150
parameter tensors, as many per million parameters as a GPT) predicting the
next token of 8 sequences of 32. The loops take turns, `--block` steps each
(back to back, as a job takes them: the client lingers between steps to send
several together), so that machine noise hits them alike:

- plain:   forward, backward, optimizer.step
- clip:    plus clip_grad_norm_(params, 1.0), the common practice
- naive:   plus a per-parameter torch.norm compared with a threshold, as blog
           posts show (each comparison is a host sync)
- gradguard: gradguard.watch(..., mode="enforce", max_norm=1.0) replacing the
           clip, streaming to a real `gradguard serve` started here
- lockstep (only when named in --loops): the same with max_lag=0: each step
           waits for the service's decision on it (one round trip)
- eager (only when named in --loops): the same with linger=0, a message
           per step
- snapshots (only when named in --loops): the gradguard loop with in-memory
           snapshots for rollback every --snapshot-every steps (10)

Prints each loop's median step time and the ratios the client is held to:
gradguard/clip (target <= 1.02) and gradguard/naive (target < 1), each as the
ratio of the medians, paired by turn (the median of the ratios of the turns'
mean steps, with a bootstrap 95% interval) and paired step by step (the
median of the k-th steps' ratios); the pairings cancel the machine's drift.
Also what lock-step costs on top, and the service's CPU per summary. `--loops naive,gradguard` runs only those,
for more steps each in the same time.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import gradguard

ROOT = Path(__file__).resolve().parents[3]


LOOPS = ("plain", "clip", "naive", "gradguard")
# Run when named: the client in lock-step, and sending every step on its own.
EXTRA_LOOPS = ("lockstep", "eager", "snapshots")
VOCAB = 1024
CONTEXT = 32


def mlp() -> torch.nn.Module:
    widths = [512, 1024, 1024, 1024, 512, 10]
    layers: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
    return torch.nn.Sequential(*layers[:-1])


class Transformer(torch.nn.Module):
    """A small GPT-style decoder: token and position embeddings, pre-norm
    blocks with causal self-attention, a final norm and the output head."""

    def __init__(self, d: int = 128, layers: int = 12):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, d)
        self.position = torch.nn.Parameter(torch.zeros(CONTEXT, d))
        block = torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, VOCAB)
        self.register_buffer("causal", torch.nn.Transformer.generate_square_subsequent_mask(CONTEXT))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        h = self.embed(tokens) + self.position[:n]
        h = self.blocks(h, mask=self.causal[:n, :n], is_causal=True)
        return self.head(self.norm(h)).flatten(0, 1)


def model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return Transformer() if kind == "transformer" else mlp()


def task(kind: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task, so that a healthy run gets no advice and every loop
    does the same work: labels from a fixed random teacher (mlp), or sequences
    that follow a fixed rule, x[t+1] = (5 x[t] + 3) mod VOCAB (transformer)."""
    gen = torch.Generator().manual_seed(1)
    if kind == "transformer":
        start = torch.randint(0, VOCAB, (batch, 1), generator=gen)
        seq = [start]
        for _ in range(CONTEXT):
            seq.append((seq[-1] * 5 + 3) % VOCAB)
        tokens = torch.cat(seq, 1)
        return tokens[:, :-1], tokens[:, 1:].flatten()
    x = torch.randn(batch, 512, generator=gen)
    return x, (x @ torch.randn(512, 10, generator=gen)).argmax(1)


def server_bin() -> str:
    if os.environ.get("GRADGUARD_BIN"):
        return os.environ["GRADGUARD_BIN"]
    for build in ("release", "debug"):
        path = ROOT / "target" / build / "gradguard"
        if path.exists():
            return str(path)
    sys.exit("no gradguard binary: cargo build --release (or set GRADGUARD_BIN)")


def start_server(*flags: str, nice: bool = False) -> tuple[subprocess.Popen, str]:
    """`gradguard serve` on free loopback ports (a fresh data directory), and
    its gRPC address."""
    data = tempfile.mkdtemp(prefix="gradguard-bench-")
    command = [server_bin(), "serve", "--grpc-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"]
    command += ["--data-dir", data, *flags]
    server = subprocess.Popen(
        ["nice", "-n", "19", *command] if nice else command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return server, server.stdout.readline().split("grpc=")[1].split()[0]


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Loop:
    def __init__(self, name: str, kind: str, x: torch.Tensor, y: torch.Tensor):
        self.name = name
        self.model = self.make_model(kind, x.device)
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.x, self.y = x, y
        self.times: list[float] = []
        self.block: list[float] = []
        self.guard = None

    def make_model(self, kind: str, device: torch.device) -> torch.nn.Module:
        return model(kind).to(device)

    def step(self) -> None:
        sync()
        t = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        # What each loop adds to the plain step, timed on its own (CPU only:
        # on a GPU it would need a sync here, which changes the step).
        b = time.perf_counter()
        go = True
        if self.name == "clip":
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        elif self.name == "naive":
            for i, p in enumerate(self.params):
                norm = torch.norm(p.grad)
                if norm > 1e6:  # a host sync per parameter
                    print(f"step: gradient norm of parameter {i} is {norm}")
        elif self.guard is not None:
            go = self.guard.step(loss)
        self.block.append(time.perf_counter() - b)
        if go:
            self.opt.step()
        sync()
        self.times.append(time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("mlp", "transformer"), default="mlp")
    ap.add_argument("--steps", type=int, default=40, help="steps per loop per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=10, help="steps a loop takes back to back in its turn")
    ap.add_argument("--linger", type=float, help="the gradguard loop's linger (default: the client's)")
    ap.add_argument(
        "--loops",
        type=lambda v: v.split(","),
        default=LOOPS,
        help=f"which loops, comma-separated (default: {','.join(LOOPS)}; also lockstep and eager, the client "
        "with max_lag=0 or linger=0); fewer give each more steps",
    )
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch", type=int, help="default: 256 (mlp), 8 sequences (transformer)")
    ap.add_argument("--snapshot-every", type=int, default=10, help="the snapshots loop's snapshot_every")
    args = ap.parse_args()
    if unknown := set(args.loops) - set(LOOPS + EXTRA_LOOPS):
        ap.error(f"--loops: unknown {', '.join(sorted(unknown))} (known: {', '.join(LOOPS + EXTRA_LOOPS)})")
    if args.batch is None:
        args.batch = 8 if args.model == "transformer" else 256
    torch.set_num_threads(args.threads)

    # The service normally runs on another machine; here it shares the CPU,
    # so it runs at the lowest priority, taking only what the job leaves.
    server, addr = start_server(nice=True)
    try:
        x, y = (t.to(args.device) for t in task(args.model, args.batch))
        loops = [Loop(n, args.model, x, y) for n in args.loops]
        named = {loop.name: loop for loop in loops}
        if "gradguard" in named:
            g = named["gradguard"]
            options = {} if args.linger is None else {"linger": args.linger}
            g.guard = gradguard.watch(g.model, g.opt, job="bench", server=addr, max_norm=1.0, **options)
        if "lockstep" in named:
            g = named["lockstep"]
            g.guard = gradguard.watch(g.model, g.opt, job="bench-lockstep", server=addr, max_norm=1.0, max_lag=0)
        if "eager" in named:
            g = named["eager"]
            g.guard = gradguard.watch(g.model, g.opt, job="bench-eager", server=addr, max_norm=1.0, linger=0)
        if "snapshots" in named:
            g = named["snapshots"]
            g.guard = gradguard.watch(
                g.model, g.opt, job="bench-snapshots", server=addr, max_norm=1.0, snapshot_every=args.snapshot_every
            )
        warm_up(loops)
        server_cpu = process_cpu(server.pid)
        take_turns(loops, args.rounds * args.steps, args.block)
        stats = {loop.name: loop.guard.stats for loop in loops if loop.guard is not None}
        for loop in loops:
            if loop.guard is not None:
                loop.guard.close()
        server_cpu = process_cpu(server.pid) - server_cpu
    finally:
        server.terminate()
        server.wait()

    params = sum(p.numel() for p in loops[0].params)
    print(
        f"model: {args.model}, {params / 1e6:.1f} M parameters in {len(loops[0].params)} tensors, batch {args.batch}, AdamW, torch {torch.__version__}, "
        f"{args.device}, {args.threads} thread(s); {args.rounds} rounds x {args.steps} steps per loop, in turns of {args.block}"
    )
    median = {loop.name: statistics.median(loop.times) * 1e3 for loop in loops}
    first = loops[0].name
    for name, ms in median.items():
        print(f"{name:>10}: median {ms:7.2f} ms/step   ({ms / median[first]:.3f}x {first})")
    for name, st in stats.items():
        print(
            f"{name} sent {st.sent} summaries in {st.messages} messages ({st.urgent} urgent), dropped {st.dropped}; "
            f"advice received {st.advice_received}; clipped {st.clipped} of {st.steps} steps at {st.clip_norm}"
            + (f"; {st.snapshots} snapshots held" if st.snapshots else "")
        )
    summaries = sum(st.sent for st in stats.values())
    if summaries:
        print(f"the service (nice 19, same CPUs) used {server_cpu / summaries * 1e3:.3f} ms of CPU per summary")

    # The loops take their k-th steps in the same turn, so the k-th steps
    # share the machine's state of the moment: the median of their ratios
    # cancels drift that the ratio of two medians keeps.
    by_name = {loop.name: loop.times for loop in loops}

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(by_name[a], by_name[b]))

    def by_turn(a: str, b: str) -> str:
        return paired_by_turn(by_name[a], by_name[b], args.block)

    targets = {
        ("gradguard", "clip"): "<= 1.02",
        ("gradguard", "naive"): "< 1",
        ("lockstep", "gradguard"): "",
        ("eager", "naive"): "",
        ("gradguard", "eager"): "",
        ("snapshots", "gradguard"): "",
    }
    for (a, b), target in targets.items():
        if a in median and b in median:
            print(
                f"{a}/{b}: medians {median[a] / median[b]:.3f}, paired by turn {by_turn(a, b)}, "
                f"step by step {paired(a, b):.3f}" + (f" (target {target})" if target else "")
            )
    if args.device == "cpu":
        added = {
            loop.name: statistics.median(loop.block) * 1e3
            for loop in loops
            if loop.name in ("clip", "naive", "gradguard", "eager")
        }
        if added:
            print(
                "added to the step (median, between backward and optimizer.step): "
                + ", ".join(f"{name} {ms:.3f} ms" for name, ms in added.items())
                + (
                    f"; gradguard/naive {added['gradguard'] / added['naive']:.3f}"
                    if {"gradguard", "naive"} <= added.keys()
                    else ""
                )
            )
    if {"lockstep", "gradguard"} <= median.keys():
        print(
            f"lock-step (max_lag=0) costs {median['lockstep'] - median['gradguard']:+.3f} ms/step "
            f"({median['lockstep'] / median['gradguard']:.3f}x gradguard); lag timeouts {stats['lockstep'].lag_timeouts}"
        )


def warm_up(loops: list[Loop], steps: int = 5) -> None:
    """Steps every loop a few times, not counted."""
    for loop in loops:
        for _ in range(steps):
            loop.step()
        loop.times.clear()
        loop.block.clear()


def take_turns(loops: list[Loop], steps: int, block: int) -> None:
    """`steps` steps of every loop, in turns of `block`, so that drift in
    the machine's speed (shared, noisy) lands on every loop alike. The order
    rotates from turn to turn: a loop whose turn follows another's starts
    with that one's model in the caches."""
    for turn in range(math.ceil(steps / block)):
        for loop in loops[turn % len(loops) :] + loops[: turn % len(loops)]:
            for _ in range(block):
                loop.step()


def paired_by_turn(a: list[float], b: list[float], block: int) -> str:
    """The median of the turns' ratios of mean steps, with a bootstrap 95% interval."""
    turns = range(0, len(a) - block + 1, block)
    ratios = [statistics.mean(a[i : i + block]) / statistics.mean(b[i : i + block]) for i in turns]
    rng = random.Random(0)
    resampled = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    low, high = resampled[50], resampled[1949]
    return f"{statistics.median(ratios):.3f} [{low:.3f}, {high:.3f}] over {len(ratios)} turns"


def process_cpu(pid: int) -> float:
    """Seconds of CPU a process has used (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
