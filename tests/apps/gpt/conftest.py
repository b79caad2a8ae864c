from pathlib import Path

import pytest


def write_text_folder(folder: Path) -> Path:
    """A small corpus of the user's own text files."""
    (folder / "sub").mkdir(parents=True)
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}\n" for i in range(400)]
    (folder / "a.txt").write_text("".join(lines[:200]))
    (folder / "sub" / "b.txt").write_text("".join(lines[200:]))
    (folder / "ignored.md").write_text("not a .txt file")
    return folder


@pytest.fixture
def text_folder(tmp_path):
    return write_text_folder(tmp_path / "corpus")
