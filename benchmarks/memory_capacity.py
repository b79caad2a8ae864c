"""The largest GPT that trains under a hard memory cap: plain PyTorch against Loom with NVMe offload.

    python -m benchmarks.memory_capacity                # 3 GiB cap, full search (long: see below)
    python -m benchmarks.memory_capacity --quick        # 1 GiB cap, bounded search, < 60 s

Each trial is a child process inside a cgroup whose memory limit is the cap (cgroup v1
`memory.limit_in_bytes` or v2 `memory.max`): every byte it touches counts (heap, torch's
allocator, thread stacks, page cache of buffered files), and going over kills it; no swap on these
machines. A model "fits" when its child completes 2 training steps (forward, backward, AdamW)
and exits 0.

The family is one GPT shape per size index k: d_model = 64 k, k layers, k heads of 64, vocabulary
8192, context 64, batch 1 (12 k (64 k)^2 + 8192 x 64 k parameters: k=14 is 0.2 B, k=48 5.5 B).
The same k means the same model and the same tokens on both sides.

- plain: the model built in fp32, `torch.optim.AdamW`, `loss.backward()`, `opt.step()`.
- Loom: the model built on the meta device and made chunk by chunk (`GPT.init_parameter`),
  the zero plugin with `parallel.offload=nvme`: parameters, fp32 master weights (the same bytes,
  as the working precision is fp32) and Adam moments in pre-allocated files on the NVMe store,
  `memory.device_gb` of chunks in memory, and `memory.step_in_backward` so that no gradient is
  ever stored (12 bytes per parameter on disk).

For each side: exponential search from a start size, then bisection on k. Loom's limit is usually
the free disk space, which the store checks before it starts (so a size that cannot fit on the
disk is refused in a second, not after an hour). Prints JSON lines per trial and then
`{"name": "capacity_ratio", "value": loom_params / plain_params, ...}`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 8192
SEQ = 64
BATCH = 1


def family(k: int) -> dict:
    return {"n_layer": k, "n_head": k, "d_model": 64 * k, "seq_len": SEQ, "vocab_size": VOCAB,
            "bias": True, "tie_weights": True, "dropout": 0.0}


def params_of(k: int) -> int:
    d = 64 * k
    per_layer = 12 * d * d + 13 * d          # qkv, proj, fc, fc2 weights and biases, two LayerNorms
    return k * per_layer + VOCAB * d + SEQ * d + 2 * d


# ----------------------------------------------------------------------------------------------
# children: run inside the cap
# ----------------------------------------------------------------------------------------------

def _child(who: str, k: int, nvme_dir: str, device_gb: float) -> None:
    import torch
    import torch.nn.functional as F

    from apps.gpt.config import GPTModelConfig
    from apps.gpt.model import GPT

    torch.manual_seed(0)
    cfg = GPTModelConfig(**family(k))
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def loss_of(model):
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))

    t0 = time.perf_counter()
    losses = []
    if who == "plain":
        model = GPT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        built = time.perf_counter()
        for _ in range(2):
            loss = loss_of(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
    else:
        from core.booster import ZeroPlugin
        from core.config import MemoryConfig
        from core.distributed import Layout, ParallelMesh

        with torch.device("meta"):
            model = GPT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        largest = max(p.numel() for p in model.parameters())
        memory = MemoryConfig(chunk_mb=largest * 4 / 2**20, device_gb=device_gb, io_threads=2, prefetch=1,
                              step_in_backward=True)
        plugin = ZeroPlugin(ParallelMesh.build(Layout()), "fp32", stage=3, offload="nvme", memory=memory,
                              nvme_dir=nvme_dir, materialize=model.init_parameter)
        wrapped, chunk_opt = plugin.configure(model, opt)
        built = time.perf_counter()
        for _ in range(2):
            loss = loss_of(wrapped)
            chunk_opt.backward(loss)
            chunk_opt.step()
            chunk_opt.zero_grad()
            losses.append(float(loss))
    done = time.perf_counter()
    print(json.dumps({"losses": losses, "build_s": round(built - t0, 1), "steps_s": round(done - built, 1)}))


# ----------------------------------------------------------------------------------------------
# the cap
# ----------------------------------------------------------------------------------------------

class MemoryCap:
    """A cgroup with a memory limit; `run` starts a command inside it."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.path = None
        root, rel, v2 = self._find()
        name = f"loom-capacity-{os.getpid()}"
        self.path = Path(root) / rel.lstrip("/") / name
        try:
            self.path.mkdir()
            if v2:
                (self.path / "memory.max").write_text(str(nbytes))
                (self.path / "memory.swap.max").write_text("0") if (self.path / "memory.swap.max").exists() else None
            else:
                (self.path / "memory.limit_in_bytes").write_text(str(nbytes))
        except OSError as e:
            raise SystemExit(f"cannot create a memory cgroup at {self.path} ({e.strerror}); this benchmark needs "
                             f"a writable cgroup memory controller (root in a container usually has one)") from None

    @staticmethod
    def _find() -> tuple[str, str, bool]:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hid, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(","):
                return "/sys/fs/cgroup/memory", rel, False
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return "/sys/fs/cgroup", line[3:], True
        raise SystemExit("no cgroup memory controller found in /proc/self/cgroup")

    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        inner = " ".join(f"'{a}'" for a in argv)
        cmd = ["sh", "-c", f"echo $$ > {self.path}/cgroup.procs && exec {inner}"]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(cmd, -1, e.stdout or "", "timeout")

    def peak(self) -> int | None:
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            f = self.path / name
            if f.exists():
                return int(f.read_text())
        return None

    def reset_peak(self) -> None:
        f = self.path / "memory.max_usage_in_bytes"
        if f.exists():
            f.write_text("0")

    def close(self) -> None:
        if self.path is not None and self.path.exists():
            try:
                self.path.rmdir()
            except OSError:
                pass


def prepare_kernels() -> bool:
    """Compile (or find) the C++ CPU Adam here, in the uncapped parent, before any capped child
    starts: a child that compiled it would run the compiler under the cap, where it can be killed
    mid-build, and would count the compile in its trial. The children then load the cached build.
    Says on stderr where the kernel is (or why there is none); True if Loom's side will use it."""
    from loom_kernels import cpu_adam

    ready = cpu_adam.load() is not None
    print(cpu_adam.build_report(), file=sys.stderr, flush=True)
    return ready


def trial(cap: MemoryCap, who: str, k: int, nvme_root: Path, device_gb: float, timeout: float) -> dict:
    nvme_dir = Path(tempfile.mkdtemp(prefix=f"k{k}-", dir=nvme_root))
    cap.reset_peak()
    t = time.perf_counter()
    r = cap.run([sys.executable, "-m", "benchmarks.memory_capacity", "--child", who, str(k),
                 "--nvme-dir", str(nvme_dir), "--device-gb", str(device_gb)], timeout)
    shutil.rmtree(nvme_dir, ignore_errors=True)
    row = {"name": "capacity_trial", "who": who, "k": k, "params": params_of(k), "fits": r.returncode == 0,
           "seconds": round(time.perf_counter() - t, 1), "peak_gib": None}
    peak = cap.peak()
    if peak is not None:
        row["peak_gib"] = round(peak / 2**30, 3)
    if r.returncode == 0:
        row.update(json.loads(r.stdout.strip().splitlines()[-1]))
    else:
        killed = r.returncode in (137, -9)
        last = (r.stderr or "").strip().splitlines()
        row["why"] = "over the memory cap (killed)" if killed else (
            "timeout" if r.stderr == "timeout" else (last[-1][:300] if last else f"exit {r.returncode}"))
    print(json.dumps(row), flush=True)
    return row


def largest(fits, start: int, k_max: int) -> int:
    """Largest k in [1, k_max] with fits(k), for a monotone fits: galloping from the estimate
    `start` (steps 1, 2, 4, ... up or down) until the answer is bracketed, then bisection.
    A good estimate costs two trials. 0 if nothing fits."""
    k = max(1, min(start, k_max))
    if fits(k):
        lo, step = k, 1
        while True:
            nxt = min(lo + step, k_max)
            if nxt == lo:
                return lo
            if not fits(nxt):
                hi = nxt
                break
            lo, step = nxt, 2 * step
    else:
        if k == 1:
            return 0
        hi, step = k, 1
        while True:
            nxt = max(hi - step, 1)
            if fits(nxt):
                lo = nxt
                break
            if nxt == 1:
                return 0
            hi, step = nxt, 2 * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def estimate(bytes_per_param: float, room: float, k_max: int) -> int:
    """The largest k whose parameters times `bytes_per_param` fit in `room` bytes."""
    return max([k for k in range(1, k_max + 1) if params_of(k) * bytes_per_param <= room] or [1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap-gb", type=float, default=None, help="memory cap in GiB (default 3, or 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="1 GiB cap, Loom tried only up to 4x plain's size")
    ap.add_argument("--nvme-dir", default=None, help="folder on the disk Loom offloads to (default: a temp dir)")
    ap.add_argument("--device-gb", type=float, default=None, help="Loom's in-memory chunk budget")
    ap.add_argument("--k-max", type=int, default=96, help="largest size index tried")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per trial")
    ap.add_argument("--child", nargs=2, metavar=("WHO", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]), args.nvme_dir, args.device_gb)
        return 0

    from benchmarks._machine import machine

    # stopped from outside: still kill the trial, remove the cgroup and the offload files
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cap_gb = args.cap_gb or (1.0 if args.quick else 3.0)
    cpu_adam_kernel = prepare_kernels()      # before the cap exists: never compiled under it
    device_gb = args.device_gb if args.device_gb is not None else cap_gb / 8
    nvme_root = Path(args.nvme_dir or tempfile.mkdtemp(prefix="loom-capacity-"))
    nvme_root.mkdir(parents=True, exist_ok=True)
    cap = MemoryCap(int(cap_gb * 2**30))
    rows: dict[tuple[str, int], dict] = {}

    def fits(who):
        def f(k):
            if (who, k) not in rows:
                rows[who, k] = trial(cap, who, k, nvme_root, device_gb, args.timeout)
            return rows[who, k]["fits"]
        return f

    try:
        # plain fp32 AdamW: 16 bytes per parameter (weight, gradient, two moments) + ~0.35 GiB of runtime
        plain_k = largest(fits("plain"), estimate(16, cap_gb * 2**30 - 0.35 * 2**30, args.k_max), args.k_max)
        if plain_k == 0:
            raise SystemExit(f"plain PyTorch fits no model of the family under {cap_gb} GiB")
        if args.quick:   # bounded: is there a size with >= 4x plain's parameters that Loom trains?
            k4 = next(k for k in range(plain_k, args.k_max + 1) if params_of(k) >= 4 * params_of(plain_k))
            loom_k = k4 if fits("loom")(k4) else largest(fits("loom"), plain_k, k4)
        else:
            # Loom: 12 bytes per parameter on the disk (fp32 weights = masters, two moments)
            disk = shutil.disk_usage(nvme_root).free
            loom_k = largest(fits("loom"), max(plain_k, estimate(12, 0.9 * disk, args.k_max)), args.k_max)
    finally:
        cap.close()
        if args.nvme_dir is None:
            shutil.rmtree(nvme_root, ignore_errors=True)
    a, b = params_of(plain_k), params_of(loom_k)
    print(json.dumps({"name": "capacity_ratio", "value": round(b / a, 2), "unit": "x",
                      "plain_params": a, "loom_params": b, "plain_k": plain_k, "loom_k": loom_k,
                      "cap_gib": cap_gb, "loom_device_gb": device_gb, "quick": args.quick,
                      "cpu_adam_kernel": cpu_adam_kernel,
                      "disk_free_gib": round(shutil.disk_usage(nvme_root.parent).free / 2**30, 1),
                      "baseline": {"colossal_ai_seed": 15, "zero_offload": 10}, "target": 30,
                      "machine": machine()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
