"""FASTA input for structure prediction: every record is one target.

Read strictly, so that a typo fails before any model runs: letters outside the 20 amino acids
(and X for unknown) are named with their record and 1-based position, empty records and repeated
names are refused, a missing file says so, and a file that is not text (binary, compressed, another
encoding) is named with its first offending byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from core.errors import LoomError

AMINO_ACIDS = set("ACDEFGHIKLMNPQRSTVWY")
ALLOWED = AMINO_ACIDS | {"X"}


@dataclass(frozen=True)
class Target:
    name: str          # the record's first word, used for output file names
    description: str   # the whole header line
    sequence: str


def _safe_name(word: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in word) or "target"


def parse_fasta(text: str, source: str = "input") -> list[Target]:
    targets: list[Target] = []
    header, lines, line_no = None, [], 0

    def close() -> None:
        if header is None:
            return
        sequence = "".join(lines).upper()
        name = _safe_name(header.split()[0] if header.split() else "")
        if not sequence:
            raise LoomError(f"{source}: record '{header}' (line {header_line}) has no sequence")
        bad = [(i + 1, c) for i, c in enumerate(sequence) if c not in ALLOWED]
        if bad:
            shown = ", ".join(f"'{c}' at {pos}" for pos, c in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise LoomError(f"{source}: record '{name}' has letters that are not amino acids: {shown} "
                            f"(allowed: {''.join(sorted(AMINO_ACIDS))}, and X for unknown)")
        if any(t.name == name for t in targets):
            raise LoomError(f"{source}: two records are named '{name}'; each target needs its own name")
        targets.append(Target(name, header, sequence))

    header_line = 0
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith(">"):
            close()
            header, lines, header_line = line[1:].strip(), [], line_no
        elif header is None:
            raise LoomError(f"{source}: line {line_no} holds sequence before any '>' header; a FASTA record "
                            f"starts with '>name'")
        else:
            lines.append("".join(line.split()))
    close()
    if not targets:
        raise LoomError(f"{source}: no FASTA records (a record is a '>name' line followed by its sequence)")
    return targets


# Bytes that never occur in a text file: the C0 controls other than tab, line feed, vertical tab,
# form feed and carriage return, and DEL.
_CONTROL = re.compile(rb"[\x00-\x08\x0e-\x1f\x7f]")
_COMPRESSED = {rb"\x1f\x8b": "gzip", rb"BZh[1-9]": "bzip2", rb"\xfd7zXZ\x00": "xz", rb"PK\x03\x04": "zip",
               rb"\x28\xb5\x2f\xfd": "zstd"}


def decode_text(data: bytes, source: str, kind: str) -> str:
    """`data` as UTF-8 text (a leading byte-order mark dropped); a `LoomError` naming the first byte
    that no text file holds (a control byte such as NUL, or one that is not UTF-8) and its offset."""
    for magic, fmt in _COMPRESSED.items():
        if re.match(magic, data):
            raise LoomError(f"{source} is {fmt}-compressed, not a text {kind}; decompress it first")
    skip = 3 if data.startswith(b"\xef\xbb\xbf") else 0          # a byte-order mark
    try:
        text, undecodable = data[skip:].decode("utf-8"), len(data)
    except UnicodeDecodeError as e:
        text, undecodable = "", skip + e.start
    control = _CONTROL.search(data, 0, undecodable)                # whichever comes first is named
    if control is not None:
        at = control.start()
        bad = f"byte 0x{data[at]:02x} at offset {at} is a control character"
    elif undecodable < len(data):
        bad = f"byte 0x{data[undecodable]:02x} at offset {undecodable} is not UTF-8 text"
    else:
        return text
    raise LoomError(f"{source} is not a text {kind} ({bad}); pass a plain-text file")


def read_fasta(path: str | Path) -> list[Target]:
    path = Path(path)
    if path.is_dir():
        raise LoomError(f"data.fasta: {path} is a folder, not a FASTA file")
    if not path.is_file():
        raise LoomError(f"FASTA file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LoomError(f"FASTA file {path} cannot be read: {e.strerror or e}") from None
    return parse_fasta(decode_text(data, str(path), "FASTA file"), str(path))
