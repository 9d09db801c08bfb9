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
    widen(out / "gradguard" / "v1")


# The oldest runtimes the stubs work with (tests/test_stubs.py runs them
# under these in a second environment made by .ci/run).
MIN_PROTOBUF = "5.26.1"
MIN_GRPCIO = "1.63.0"

_RUNTIME_IMPORT = "from google.protobuf import runtime_version as _runtime_version\n"


def widen(stubs: Path) -> None:
    """Lets the stubs load on every runtime they work with, not only the one
    grpcio-tools was built against: the generated code pins protobuf's major
    version (`ValidateProtobufRuntimeVersion`, same major only) and the
    grpcio it was made by. What the stubs use (a serialized descriptor built
    with `builder`, `_registered_method` calls) is in protobuf 5.26 and grpcio
    1.63, so the pins become those minimums."""
    pb2 = stubs / "gradguard_pb2.py"
    text = pb2.read_text().replace(_RUNTIME_IMPORT, "")
    start = text.index("_runtime_version.ValidateProtobufRuntimeVersion(")
    end = text.index(")\n", start) + 2
    note = f"# Works with protobuf >= {MIN_PROTOBUF} (tools/generate_stubs.py removed the exact-major pin).\n"
    text = text[:start] + note + text[end:]
    pb2.write_text(text)
    grpc_stub = stubs / "gradguard_pb2_grpc.py"
    text = grpc_stub.read_text()
    pinned = text.split("GRPC_GENERATED_VERSION = '", 1)[1].split("'", 1)[0]
    grpc_stub.write_text(
        text.replace(f"GRPC_GENERATED_VERSION = '{pinned}'", f"GRPC_GENERATED_VERSION = '{MIN_GRPCIO}'")
    )


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
