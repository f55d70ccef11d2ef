"""Regenerate the Python gRPC stubs from protos/ into services/pb/ (the `radixserve.v1` package).

Run after editing a .proto: `python scripts/gen_protos.py`. tests/packaging/test_protos.py fails when the
committed stubs differ from what this produces.
"""

import pathlib
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "services" / "pb"


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Write the *_pb2.py, *_pb2.pyi and *_pb2_grpc.py files under out_dir; return their paths."""
    protos = sorted(PROTO_DIR.rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
    ]
    args += [str(p.relative_to(PROTO_DIR)) for p in protos]
    out_dir.mkdir(parents=True, exist_ok=True)
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    # Only the leaf package (radixserve/v1) is a package of its own: pyproject maps it to
    # radixserve.v1, and `radixserve` itself is services/.
    for pkg in {p.parent.relative_to(PROTO_DIR) for p in protos}:
        (out_dir / pkg / "__init__.py").touch()
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def main() -> int:
    if "--check" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = {p.relative_to(tmp): p.read_bytes() for p in generate(pathlib.Path(tmp))}
        stale = [
            str(rel)
            for rel, data in fresh.items()
            if not (OUT_DIR / rel).exists() or (OUT_DIR / rel).read_bytes() != data
        ]
        print("stale stubs: " + ", ".join(stale) if stale else "stubs up to date")
        return 1 if stale else 0
    for path in generate(OUT_DIR):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
