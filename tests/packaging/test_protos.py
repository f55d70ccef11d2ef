"""The committed stubs match protos/, and every proto field and message is documented."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_stubs_match_protos():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_field_and_message_is_doc_commented():
    undocumented = []
    for proto in sorted((ROOT / "protos").rglob("*.proto")):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            code = line.strip()
            is_field = re.match(r"^(optional |repeated )?[\w.]+ \w+ = \d+;", code)
            is_decl = re.match(r"^(message|enum|rpc) \w+", code)
            is_enum_value = re.match(r"^[A-Z0-9_]+ = \d+;", code)
            if (is_field or is_decl or is_enum_value) and not lines[i - 1].strip().startswith("//"):
                undocumented.append(f"{proto.name}:{i + 1}: {code}")
    assert not undocumented, "undocumented:\n" + "\n".join(undocumented)


def test_package_is_versioned():
    for proto in (ROOT / "protos").rglob("*.proto"):
        assert "package radixserve.v1;" in proto.read_text(), proto
