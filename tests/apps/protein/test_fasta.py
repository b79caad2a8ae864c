"""FASTA input: records become targets; bad input gets one clear message."""

import pytest

from apps.protein.fasta import parse_fasta, read_fasta
from core.errors import LoomError


def test_records_become_targets():
    targets = parse_fasta(">one first protein\nMKTAY\niakq\n\n>two|x\nGGX\n")
    assert [(t.name, t.sequence) for t in targets] == [("one", "MKTAYIAKQ"), ("two_x", "GGX")]
    assert targets[0].description == "one first protein"


@pytest.mark.parametrize("text,says", [
    (">a\nMKTB1Y\n", "record 'a' has letters that are not amino acids: 'B' at 4, '1' at 5"),
    (">a\n>b\nMK\n", "record 'a' (line 1) has no sequence"),
    ("MKT\n", "line 1 holds sequence before any '>' header"),
    ("", "no FASTA records"),
    (">a\nMK\n>a\nGG\n", "two records are named 'a'"),
])
def test_bad_input_is_named(text, says):
    with pytest.raises(LoomError, match=says.replace("(", r"\(").replace(")", r"\)")):
        parse_fasta(text, "x.fasta")


def test_missing_file(tmp_path):
    with pytest.raises(LoomError, match="does not exist"):
        read_fasta(tmp_path / "nope.fasta")
