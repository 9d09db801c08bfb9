"""Records per second of `gradguard replay` for each log format, and, for
TensorBoard, against the tensorboard package's own reader on the same file.

    cargo build --release && cargo build --release --example replay_files
    clients/python/.venv/bin/python clients/python/benchmarks/replay_formats.py [--steps 1000000] [--hf-steps 100000] [--tb-ref-steps 100000] [--rounds 3]

Writes the logs with `target/release/examples/replay_files` into a temporary
directory (STEPS steps per format, HF_STEPS for `trainer_state.json`), then
times `target/release/gradguard replay FILE` (table output to /dev/null; the
engine runs as always) ROUNDS times per format and keeps the best. Records
per second: the records the summary counts over the wall time of the whole
process (start, read, engine, report).

TensorBoard's reference: `EventFileLoader(path).Load()` (without TensorFlow,
its pure-Python record reader, which checks both checksums too), iterating
every event and pulling each scalar's tag, step and value, on a file of
TB_REF_STEPS steps; `gradguard replay` reads the same file in the same round,
and the ratio of the two times is reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
BIN = ROOT / "target/release/gradguard"
GEN = ROOT / "target/release/examples/replay_files"


def replay(path: Path, fmt: str) -> tuple[float, int]:
    """Wall seconds of one replay and the records it read."""
    start = time.perf_counter()
    out = subprocess.run(
        [str(BIN), "replay", "--json", "--severity", "critical", "--format", fmt, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    took = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"replay {path} failed ({out.returncode}): {out.stderr[-2000:]}")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    return took, summary["records"]


def tensorboard_reference(path: Path) -> tuple[float, int]:
    """Seconds for tensorboard's loader to read every scalar of `path`, and the steps seen."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    start = time.perf_counter()
    steps = set()
    for event in EventFileLoader(str(path)).Load():
        if not event.HasField("summary"):
            continue
        for value in event.summary.value:
            # The loader turns simple_value into a scalar tensor (data_compat).
            if value.HasField("tensor"):
                float(tensor_util.make_ndarray(value.tensor))
            else:
                float(value.simple_value)
            steps.add(event.step)
    return time.perf_counter() - start, len(steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--hf-steps", type=int, default=100_000)
    p.add_argument("--tb-ref-steps", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    for exe in (BIN, GEN):
        if not exe.exists():
            sys.exit(f"{exe} is missing: cargo build --release && cargo build --release --example replay_files")

    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp) / "big", Path(tmp) / "small"
        start = time.perf_counter()
        subprocess.run([str(GEN), str(big), str(args.steps), str(args.hf_steps)], check=True)
        subprocess.run([str(GEN), str(small), str(args.tb_ref_steps), "10"], check=True)
        print(f"wrote the logs in {time.perf_counter() - start:.1f} s", flush=True)
        tb = next((big / "tb").iterdir())
        files = {
            "jsonl": big / "run.jsonl",
            "llmc": big / "main.log",
            "megatron": big / "megatron.log",
            "hf": big / "hf" / "trainer_state.json",
            "tensorboard": tb,
            "csv": big / "metrics.csv",
        }
        print(f"{'format':<12} {'MiB':>7} {'records':>9} {'best s':>8} {'records/s':>11}")
        for fmt, path in files.items():
            best, records = min(replay(path, fmt) for _ in range(args.rounds))
            mib = path.stat().st_size / (1 << 20)
            print(f"{fmt:<12} {mib:7.1f} {records:9d} {best:8.3f} {records / best:11,.0f}", flush=True)

        ref_file = next((small / "tb").iterdir())
        print(f"\nTensorBoard, {args.tb_ref_steps} steps ({ref_file.stat().st_size / (1 << 20):.1f} MiB), same file:")
        ours, theirs = [], []
        for _ in range(args.rounds):
            took, records = replay(ref_file, "tensorboard")
            ours.append(took)
            took, steps = tensorboard_reference(ref_file)
            theirs.append(took)
            assert steps == records == args.tb_ref_steps, (steps, records)
        a, b = min(ours), min(theirs)
        print(f"  gradguard replay (read + engine): {a:.3f} s = {records / a:,.0f} records/s")
        print(f"  tensorboard EventFileLoader (read only): {b:.3f} s = {steps / b:,.0f} steps/s")
        print(f"  ratio: gradguard is {b / a:.1f}x faster")


if __name__ == "__main__":
    main()
