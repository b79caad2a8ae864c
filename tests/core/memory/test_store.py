"""Host and NVMe stores: round trips, aliases, asynchronous IO, and disks that are too small."""

import errno
import os
import subprocess

import pytest
import torch

from core.errors import LoomError
import core.memory.store as store_module
from core.memory.store import ALIGN, MemoryStore, NVMeStore, aligned_empty, host_empty


def test_aligned_buffers():
    for n in (1, 4095, 4096, 10_000):
        assert aligned_empty(n).data_ptr() % ALIGN == 0 and aligned_empty(n).numel() == n


def test_host_buffers_are_aligned_whole_blocks():
    for n in (1, 1023, 1024, 3001, 3 << 20):
        t = host_empty(n)
        assert t.data_ptr() % ALIGN == 0 and t.numel() == n and t.dtype == torch.float32
        assert t.untyped_storage().nbytes() >= -(-n * 4 // ALIGN) * ALIGN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvme_moves_aligned_tensors_without_the_bounce_buffer_and_the_same_bytes(tmp_path, dtype, monkeypatch):
    """Whole blocks of an aligned tensor go straight to the disk, in pieces; its tail and unaligned
    tensors go through the bounce buffer: each reads back what the other wrote, and a slot's
    neighbours are untouched."""
    monkeypatch.setattr(store_module, "PIECE", 2 * ALIGN)            # several pieces per slot
    monkeypatch.setattr(store_module, "BOUNCE", 2 * ALIGN)
    n = 7 * ALIGN // 2 + 37                                          # 3.5 blocks of fp32 and a tail
    store = NVMeStore(tmp_path, {"master": (3, n * 4)}, threads=2)
    aligned = [host_empty(n, dtype).copy_(torch.randn(n)) for _ in range(3)]
    for i, d in enumerate(aligned):
        store.write("master", i, d)
    bounce = []
    for i in range(3):
        unaligned = torch.empty(n + 1, dtype=dtype)[1:]              # never 4 KiB aligned
        assert unaligned.data_ptr() % ALIGN
        store.read("master", i, unaligned)
        assert torch.equal(unaligned, aligned[i])
        back = host_empty(n, dtype)
        store.read("master", i, back)
        assert torch.equal(back, aligned[i])
        bounce.append(unaligned)
    store.write("master", 1, bounce[2] * 2)                          # unaligned write, aligned read
    back = host_empty(n, dtype)
    store.read("master", 1, back)
    assert torch.equal(back, aligned[2] * 2)
    store.read("master", 0, back)
    assert torch.equal(back, aligned[0])
    back.untyped_storage().resize_(0)        # chunk payloads leave by resizing: still possible
    store.close()


def test_an_io_thread_s_bounce_buffer_is_one_piece_however_large_the_unaligned_tensor(tmp_path):
    n = (3 * store_module.BOUNCE + 4000) // 4                        # three pieces and a part
    store = NVMeStore(tmp_path, {"grad": (1, n * 4)}, threads=1)
    src = torch.randn(n + 1)[1:]
    store.write("grad", 0, src)
    dst = torch.empty(n + 1)[1:]
    store.read_async("grad", 0, dst).result()
    assert torch.equal(dst, src)
    main = store._local.buf                                          # this thread's, kept for the run
    worker = store._pool.submit(lambda: store._local.buf).result()
    assert main.nbytes == worker.nbytes == store_module.BOUNCE
    store.close()


def test_memory_store_round_trip_and_alias():
    store = MemoryStore(aliases={"param": "master"})
    x = torch.randn(100)
    store.write("master", 3, x)
    y = torch.empty(100)
    store.read("param", 3, y)          # the same slot
    assert torch.equal(x, y)
    assert store.view("param", 3, x) is store.view("master", 3, x)
    store.write_async("exp_avg", 0, x * 2).result()
    z = torch.empty(100)
    store.read_async("exp_avg", 0, z).result()
    assert torch.equal(z, x * 2)
    with pytest.raises(KeyError):
        store.read("exp_avg_sq", 0, z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nvme_round_trip_in_odd_sizes(tmp_path, dtype):
    n = 3001                                     # not a multiple of the 4 KiB block
    store = NVMeStore(tmp_path, {"param": (4, n * 4), "master": (4, n * 4)}, threads=2)
    data = [torch.randn(n).to(dtype) for _ in range(4)]
    futures = [store.write_async("param", i, d) for i, d in enumerate(data)]
    for f in futures:
        f.result()
    for i in reversed(range(4)):                 # neighbours are untouched by each other's writes
        out = torch.empty(n, dtype=dtype)
        store.read_async("param", i, out).result()
        assert torch.equal(out, data[i])
    assert (tmp_path / "param.bin").stat().st_size == 4 * 12288      # slots start on 4 KiB boundaries
    with pytest.raises(ValueError, match="do not fit"):
        store.write("param", 0, torch.zeros(2 * n))
    store.close()


def test_nvme_keeps_only_the_used_prefix_of_each_slot(tmp_path):
    # three chunks of 1000 floats that use 1000, 300 and 0 of them
    store = NVMeStore(tmp_path, {"master": (3, 4000)}, used={"master": [4000, 1200, 0]})
    assert (tmp_path / "master.bin").stat().st_size == 4096 + 4096 + 0
    for i in range(3):
        store.write("master", i, torch.arange(1000.0) + i)
    for i, n in enumerate((1000, 300, 0)):
        out = torch.full((1000,), -1.0)
        store.read("master", i, out)
        assert torch.equal(out[:n], torch.arange(float(n)) + i) and not out[n:].any()   # padding: zeros
    with pytest.raises(ValueError, match="must give 3 sizes"):
        NVMeStore(tmp_path / "x", {"master": (3, 4000)}, used={"master": [4000, 8000, 0]})
    store.close()


def test_nvme_alias_shares_the_file(tmp_path):
    store = NVMeStore(tmp_path, {"master": (2, 400)}, aliases={"param": "master"})
    store.write("param", 1, torch.arange(100.0))
    out = torch.empty(100)
    store.read("master", 1, out)
    assert torch.equal(out, torch.arange(100.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["master.bin"]
    store.close()


def test_unlinked_nvme_files_leave_nothing_behind_even_when_the_process_is_killed(tmp_path):
    store = NVMeStore(tmp_path / "scratch", {"param": (2, 4096)}, unlinked=True)
    assert not (tmp_path / "scratch").exists()              # files and folder gone, the open files work
    store.write("param", 1, torch.arange(1024.0))
    out = torch.empty(1024)
    store.read("param", 1, out)
    assert torch.equal(out, torch.arange(1024.0))
    store.close()
    # a process killed while it holds such a store (as a memory cap kills it) leaves no file
    import signal
    import subprocess
    import sys

    code = (f"import os, signal, torch; from core.memory.store import NVMeStore; "
            f"s = NVMeStore({str(tmp_path / 'killed')!r}, {{'param': (4, 1 << 20)}}, unlinked=True); "
            f"s.write('param', 3, torch.ones(1 << 18)); os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not (tmp_path / "killed").exists() or not any((tmp_path / "killed").iterdir())


def test_nvme_disk_too_small_is_refused_at_the_start(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(LoomError, match="has 0.0 GiB free but the offloaded state needs 0.1 GiB"):
        NVMeStore(tmp_path, {"master": (32, 4 * 2**20)})


def test_nvme_full_disk_during_a_write_says_so(tmp_path, monkeypatch):
    store = NVMeStore(tmp_path, {"grad": (1, 4096)})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    with pytest.raises(LoomError, match="the disk is full"):
        store.write_async("grad", 0, torch.zeros(1024)).result()
    store.close()


def test_a_real_small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        # 3 kinds x 2 slots x 256 KiB = 1.5 MiB do not fit in 1 MiB: refused before any training
        with pytest.raises(LoomError, match="memory.nvme_dir"):
            NVMeStore(disk, {k: (2, 2**18) for k in ("master", "exp_avg", "exp_avg_sq")})
        small = NVMeStore(disk, {"master": (2, 2**18)})   # 512 KiB fits
        small.write("master", 1, torch.ones(2**16))
        out = torch.empty(2**16)
        small.read("master", 1, out)
        assert torch.equal(out, torch.ones(2**16))
        small.close()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_closing_the_nvme_store_removes_its_files_and_keeps_what_else_is_there(tmp_path):
    store = NVMeStore(tmp_path / "rank0", {"master": (2, 4096), "exp_avg": (2, 4096)}, threads=1)
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == ["exp_avg.bin", "master.bin"]
    store.close()
    assert not (tmp_path / "rank0").exists()            # scratch space: gone with the run
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "notes.txt").write_text("mine\n")
    store = NVMeStore(tmp_path / "shared", {"master": (1, 4096)}, threads=1)
    store.close()
    assert [p.name for p in (tmp_path / "shared").iterdir()] == ["notes.txt"]
