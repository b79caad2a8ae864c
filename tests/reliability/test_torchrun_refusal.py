"""A layout refused at start under torchrun: exactly one line from the ranks (rank 0's), status 2
from every rank, and torchrun's report shows that line as the root cause (under whichever rank
torchrun saw exit first: both refuse, and each writes the line to its error file).

torchrun itself still prints its ChildFailedError traceback: its launcher raises that exception
whenever a worker exits non-zero (torch/distributed/launcher/api.py) and nothing a worker can
do changes it; a worker's error file (TORCHELASTIC_ERROR_FILE) only replaces the report's
"To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"."""

import subprocess
import sys

from benchmarks.reliability import REPO


def test_a_refused_layout_under_torchrun(app, tmp_path):
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--log-dir", str(logs), "--redirects", "3", "-m", "apps.gpt.pretrain", "parallel.dp=3",
           f"data.path={app.corpus}", "data.tokenizer=bytes", f"output.dir={tmp_path / 'run'}"]
    r = subprocess.run(cmd, cwd=REPO, env=app.env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    rank_err = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    assert sorted(rank_err) == [0, 1]
    message = ("error: parallel layout dp=3 x pp=1 x tp=1 x sp=1 needs 3 processes but the world size is 2; "
               "layouts that fit 2 processes: dp=2")
    assert len(rank_err[0].splitlines()) == 1 and rank_err[0].startswith(message), rank_err
    assert rank_err[1] == "", rank_err
    assert r.stderr.count("exitcode  : 2 ") == 2, r.stderr     # both ranks: status 2, not SIGTERM's -15
    root = r.stderr.split("Root Cause (first observed failure):")[1]
    assert f"traceback : {message}" in root, r.stderr
    assert not (tmp_path / "run").exists()                     # nothing written before the refusal
