"""FASTA input for structure prediction: every record is one target.

Read strictly, so that a typo fails before any model runs: letters outside the 20 amino acids
(and X for unknown) are named with their record and 1-based position, empty records and repeated
names are refused, and a missing file says so.
"""

from __future__ import annotations

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


def read_fasta(path: str | Path) -> list[Target]:
    path = Path(path)
    if not path.is_file():
        raise LoomError(f"FASTA file {path} does not exist")
    return parse_fasta(path.read_text(), str(path))
