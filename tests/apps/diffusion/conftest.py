import json

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def captioned_folder(tmp_path):
    """A user's folder in the diffusers convention, with a caption column named 'caption'."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        img = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        img.save(folder / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "caption": f"picture number {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
