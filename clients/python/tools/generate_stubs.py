"""Generates the gRPC stubs of `proto/gradguard/v1/gradguard.proto` into
`src/gradguard/v1/` with grpcio-tools (no system protoc needed).

    python tools/generate_stubs.py          # regenerate
    python tools/generate_stubs.py --check  # exit 1 when the committed stubs are stale
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parents[2] / "proto"
PROTO = PROTO_ROOT / "gradguard" / "v1" / "gradguard.proto"
PACKAGE = HERE.parent / "src"
STUBS = ("gradguard_pb2.py", "gradguard_pb2.pyi", "gradguard_pb2_grpc.py")


def generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO),
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed on {PROTO} (exit {code})")


def stale() -> list[str]:
    """The stub files that differ from what the proto generates now."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "gradguard" / "v1"
        committed = PACKAGE / "gradguard" / "v1"
        return [
            name
            for name in STUBS
            if not (committed / name).exists() or not filecmp.cmp(fresh / name, committed / name, shallow=False)
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the committed stubs are current")
    args = parser.parse_args()
    if args.check:
        names = stale()
        if names:
            print(f"stale stubs: {', '.join(names)}; regenerate them: python {__file__}")
            return 1
        print("stubs match proto/")
        return 0
    generate(PACKAGE)
    print(f"generated {', '.join(STUBS)} in {PACKAGE / 'gradguard' / 'v1'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
