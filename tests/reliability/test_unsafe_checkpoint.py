"""Loading a checkpoint never runs code from it: a pickle that would run code, in an otherwise
valid checkpoint (its manifest updated to match), is refused with one line."""

import shutil

import pytest
import torch

from core.checkpoint.manifest import hash_files, verify, write_manifest


class Payload:
    """Unpickled by a full unpickler, this runs `exec`, which creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _plant(folder, name, marker):
    path = folder / name
    torch.save({"state": {}, "param_groups": [], "extra": Payload(marker)}, path)
    (folder / "manifest.json").unlink()
    write_manifest(folder, hash_files(folder))   # consistent again: only the loader can refuse it
    assert verify(folder) is None


def test_the_payload_is_live(tmp_path):
    """The control: an unrestricted torch.load of the planted file does run the code."""
    marker = tmp_path / "ran"
    torch.save({"extra": Payload(marker)}, tmp_path / "x.pt")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "state.pt"])
def test_a_checkpoint_with_code_in_a_pickle_is_refused(app, unbroken, tmp_path, name):
    folder = tmp_path / "ckpt" / "step_0000006"
    shutil.copytree(unbroken.out / "checkpoints" / "step_0000006", folder)
    marker = tmp_path / "code-ran"
    _plant(folder, name, marker)
    r = app.run(tmp_path / "run", f"train.resume={folder}")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    errors = r.error_lines()
    assert len(errors) == 1 and name in errors[0], r.stderr[-3000:]
    assert not marker.exists(), "loading the checkpoint ran code from it"
