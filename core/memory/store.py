"""Where chunks live when they are not on the compute device: host memory or NVMe files.

Both stores keep fixed-size slots addressed by (kind, index) — kind is what the slot holds
("param", "master", "exp_avg", ...) — and offer synchronous and asynchronous reads and writes
(futures from a pool of IO threads, so transfers overlap with compute: the copies and the
system calls release the GIL).

`NVMeStore` pre-allocates one file per kind (`posix_fallocate`: a disk too small fails at the
start, with the space needed and the space free, not in the middle of a run), and moves data
with `preadv`/`pwritev` through 4 KiB-aligned buffers, with O_DIRECT where the file system
allows it, so that the page cache neither hides the disk's real speed nor eats the memory the
offload is meant to save.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from core.errors import LoomError

ALIGN = 4096
_LIBC = None
PIECE = 8 << 20   # bytes per system call straight from or into an aligned tensor (a multiple of ALIGN)
# bytes per system call through a thread's aligned bounce buffer (unaligned tensors), which the
# thread keeps for the run: 1 MiB moved unaligned chunks as fast as 8 MiB here (64 MiB slots, 4
# threads, O_DIRECT, three runs each: written at 5.1-6.8 GB/s against 3.0-5.2, the copies staying
# in cache; read at 1.6-1.9 against 1.3-2.0) and holds an eighth of the memory in each IO thread
BOUNCE = 1 << 20
M_MMAP_THRESHOLD = -3
M_TRIM_THRESHOLD = -1
MMAP_THRESHOLD_MAX = 32 << 20   # glibc's ceiling for the mmap threshold on 64-bit machines


def return_freed_buffers_to_the_os(threshold: int = 1 << 20, keep_top: int | None = None) -> bool:
    """Make freed buffers of `threshold` bytes or more give their memory back to the OS (glibc only).

    glibc serves allocations below its mmap threshold from the heap, and raises that threshold
    (up to 32 MiB) every time a large block is freed; after a few evictions, chunk buffers are
    heap blocks whose memory stays with the process when they are freed (measured: a 91 M
    parameter GPT offloaded to NVMe peaked at 1.46 GB of RSS instead of 0.81 GB). A fixed
    threshold keeps every buffer of `threshold` bytes or more in its own mapping, returned on free.

    The price is paid by every other allocation of that size: each is a fresh mapping whose pages
    fault in when first written, and a fixed threshold also stops glibc from raising the amount of
    free memory it keeps at the heap's top (128 KiB unless `keep_top` says more), so the heap shrinks
    and regrows between operations. Training SD v1.5 at 512 px with a 1 MiB threshold, the
    activations took 23 M page faults in two steps (109 s of system time, against 29 s with
    glibc's defaults): set it no lower than the buffers that must go back, and keep a top.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, min(threshold, MMAP_THRESHOLD_MAX)))
        if ok and keep_top is not None:
            ok = bool(libc.mallopt(M_TRIM_THRESHOLD, keep_top))
        return ok
    except (OSError, AttributeError):
        return False


def trim_heap() -> bool:
    """Give the free pages inside glibc's heap back to the OS now (`malloc_trim`, glibc only).

    Temporaries under the mmap threshold come from the heap, and the holes they leave when freed
    stay in the resident set until the heap's top is free. Where an operation makes thousands of
    small temporaries (an Evoformer in one-row chunks), that retained memory accumulates from one
    operation to the next; a trim between operations bounds it."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        return bool(_LIBC.malloc_trim(0))
    except (OSError, AttributeError):
        return False


MADV_DONTNEED = 4
MADV_POPULATE_READ = 22      # Linux 5.14


def _madvise_range(start: int, length: int, advice: int) -> bool:
    """madvise(start, length, advice) through libc; False where the call fails."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        return _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), advice) == 0
    except (OSError, AttributeError):
        return False


def _madvise(t: torch.Tensor, advice: int) -> bool:
    """madvise over the pages of CPU tensor `t` (from the page its first byte is on)."""
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return True
    start = t.data_ptr() // ALIGN * ALIGN
    return _madvise_range(start, t.data_ptr() + nbytes - start, advice)


def populate(t: torch.Tensor) -> None:
    """Bring a mapped tensor's pages in (read from the file through the page cache, in the calling
    thread, which the caller makes a background one), so that computing on it does not fault."""
    if not _madvise(t, MADV_POPULATE_READ):                 # an older kernel: touch a byte per page
        flat = t.reshape(-1).view(torch.uint8)
        flat[::ALIGN].sum()


def unpopulate(t: torch.Tensor) -> None:
    """Unmap a mapped tensor's pages from this process (they are read again if touched)."""
    _madvise(t, MADV_DONTNEED)


def filesystem_type(path: str | Path) -> str:
    """The type of the file system `path` is on ("ext4", "tmpfs", ...; "" if unknown), from the
    longest mount point in /proc/mounts that contains it."""
    target = Path(path).resolve()
    best, kind = -1, ""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = Path(fields[1].replace("\\040", " "))
        if (target == mount or mount in target.parents) and len(mount.parts) > best:
            best, kind = len(mount.parts), fields[2]
    return kind


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of `nbytes` whose address is a multiple of 4 KiB."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % ALIGN
    return raw[offset:offset + nbytes]


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask the kernel to back a large host tensor that has not been written yet with 2 MiB pages
    (transparent huge pages in "madvise" mode, the usual default). Chunk-sized buffers are made
    and dropped for every transfer (an evicted chunk's memory goes back to the OS, and comes back
    as fresh pages when the chunk returns), and each 4 KiB page of a fresh buffer faults in on its
    first write: 64 MiB buffers refilled 40 times took 655 K faults and 2.7 s of system time here,
    0.6 s with huge pages, a 3x faster refill."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < 2 * HUGE_PAGE:
        return False
    ptr = t.data_ptr()
    start, stop = -(-ptr // HUGE_PAGE) * HUGE_PAGE, (ptr + nbytes) // HUGE_PAGE * HUGE_PAGE
    return stop > start and _madvise_range(start, stop - start, MADV_HUGEPAGE)


def host_empty(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised host tensor for chunk-sized transfers: 4 KiB-aligned (NVMe reads and writes
    move its whole blocks without a bounce copy) and backed by huge pages where the kernel allows."""
    size = torch.tensor([], dtype=dtype).element_size()
    raw = aligned_empty(_round_up(numel * size))
    advise_huge_pages(raw)
    return raw.view(dtype)[:numel]


def _round_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


class Store:
    name = "store"

    def __init__(self, threads: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix=f"loom-{self.name}")

    aliases: dict[str, str] = {}
    in_memory = False          # True: `view` hands out the slots themselves

    def view(self, kind: str, index: int, like: torch.Tensor | None = None) -> torch.Tensor | None:
        """The slot as a tensor, for stores that keep slots in memory; None for files."""
        return None

    def write(self, kind: str, index: int, src: torch.Tensor) -> None:
        raise NotImplementedError

    def read(self, kind: str, index: int, dst: torch.Tensor) -> None:
        raise NotImplementedError

    def write_async(self, kind: str, index: int, src: torch.Tensor) -> Future:
        return self._pool.submit(self.write, kind, index, src)

    def read_async(self, kind: str, index: int, dst: torch.Tensor) -> Future:
        return self._pool.submit(self.read, kind, index, dst)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class MemoryStore(Store):
    """Slots in memory: host memory (pinned when the compute device is a GPU, for asynchronous
    copies), or the compute device itself for optimizer states that are not offloaded.

    `aliases` lets two kinds share one slot (the fp32 working weights *are* the fp32 master
    weights, so storing both would double the bytes for nothing)."""

    name = "host"
    in_memory = True

    def __init__(self, pin: bool = False, threads: int = 2, device: torch.device | str = "cpu",
                 aliases: dict[str, str] | None = None) -> None:
        super().__init__(threads)
        self.pin = pin
        self.device = torch.device(device)
        self.aliases = dict(aliases or {})
        self._slots: dict[tuple[str, int], torch.Tensor] = {}
        self.nbytes = 0

    def view(self, kind: str, index: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """The slot itself (created on first use with `like`'s size and dtype)."""
        key = (self.aliases.get(kind, kind), index)
        if key not in self._slots:
            if like is None:
                raise KeyError(f"host store has no {kind} slot {index}")
            t = torch.zeros(like.numel(), dtype=like.dtype, device=self.device,
                            pin_memory=self.pin and self.device.type == "cpu")
            self._slots[key] = t
            self.nbytes += t.numel() * t.element_size()
        return self._slots[key]

    def write(self, kind: str, index: int, src: torch.Tensor) -> None:
        dst = self.view(kind, index, src)
        if dst.data_ptr() != src.data_ptr():
            dst.copy_(src.reshape(-1))

    def read(self, kind: str, index: int, dst: torch.Tensor) -> None:
        key = (self.aliases.get(kind, kind), index)
        if key not in self._slots:
            raise KeyError(f"host store has no {kind} slot {index}")
        dst.reshape(-1).copy_(self._slots[key])


class NVMeStore(Store):
    """Pre-allocated files on a local disk, one per kind, read and written in aligned slots."""

    name = "nvme"

    def __init__(self, folder: str | Path, slots: dict[str, tuple[int, int]], threads: int = 4,
                 direct: bool = True, aliases: dict[str, str] | None = None,
                 used: dict[str, list[int]] | None = None, setting: str = "memory.nvme_dir",
                 unlinked: bool = False) -> None:
        """`slots[kind] = (count, slot_bytes)`: what one slot may be given; `used[kind][i]`: the
        bytes slot i really keeps (default: all). A chunk's tail past its last parameter is
        padding: only the used prefix goes to disk (on a GPT packed into chunks as large as its
        largest matrix, a third of the bytes), and it reads back as zeros. `aliases[kind] =
        other`: `kind` reads and writes `other`'s file. `setting`: the recipe key that named the
        folder, for the messages. `unlinked`: the files leave the folder as soon as they are open
        (and the folder too, when that empties it), so their space returns to the disk however the
        process ends, a kill at a memory cap included."""
        super().__init__(threads)
        self.setting = setting
        self.aliases = dict(aliases or {})
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LoomError(f"{self.setting}: cannot create {self.folder}: {e.strerror}") from None
        self.slot_bytes = {kind: size for kind, (_, size) in slots.items()}
        self._keep: dict[str, list[int]] = {}
        self._offsets: dict[str, list[int]] = {}
        for kind, (count, size) in slots.items():
            keep = list((used or {}).get(kind, [size] * count))
            if len(keep) != count or any(k > size for k in keep):
                raise ValueError(f"used[{kind!r}] must give {count} sizes of at most {size} bytes")
            offsets = [0]
            for k in keep:
                offsets.append(offsets[-1] + _round_up(k))
            self._keep[kind], self._offsets[kind] = keep, offsets
        need = sum(offsets[-1] for offsets in self._offsets.values())
        free = shutil.disk_usage(self.folder).free
        if need > free:
            raise LoomError(f"{self.setting} {self.folder} has {free / 2**30:.1f} GiB free but the offloaded "
                            f"state needs {need / 2**30:.1f} GiB; free space or point {self.setting} elsewhere")
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.drop_cache = False      # buffered reads: drop the pages read from the page cache afterwards
        self._fds: dict[str, int] = {}
        self.nbytes = need
        for kind in slots:
            self._fds[kind] = self._open(self.folder / f"{kind}.bin", self._offsets[kind][-1])
            if unlinked:
                (self.folder / f"{kind}.bin").unlink()
        if unlinked:
            self._remove_folder()
        self._local = threading.local()
        self._count = threading.Lock()
        self.bytes_read = 0
        self.bytes_written = 0

    def _open(self, path: Path, size: int) -> int:
        flags = os.O_RDWR | os.O_CREAT
        fd = -1
        if self.direct:
            try:
                fd = os.open(path, flags | os.O_DIRECT, 0o600)
            except OSError:   # tmpfs and some others refuse O_DIRECT
                self.direct = False
        if fd < 0:
            fd = os.open(path, flags, 0o600)
        try:
            os.posix_fallocate(fd, 0, max(size, 1))
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise LoomError(f"{self.setting}: not enough space to pre-allocate {size / 2**30:.1f} GiB "
                                f"for {path.name}; free space or point {self.setting} elsewhere") from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, size)
        return fd

    def _bounce(self, nbytes: int) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = aligned_empty(nbytes)
            self._local.buf = buf
        return buf[:nbytes]

    def _io(self, write: bool, kind: str, index: int, tensor: torch.Tensor) -> None:
        """One slot's bytes, moved in pieces of at most PIECE straight from or into an aligned
        tensor, else of BOUNCE through this thread's aligned buffer (so each IO thread holds at most
        BOUNCE bytes, however large the chunks are)."""
        kind = self.aliases.get(kind, kind)
        given = tensor.numel() * tensor.element_size()
        slot = self.slot_bytes[kind]
        if given > slot:
            raise ValueError(f"{given} bytes do not fit a {kind} slot of {slot}")
        flat = tensor.reshape(-1).view(torch.uint8) if tensor.numel() else tensor.view(torch.uint8)
        nbytes = min(given, self._keep[kind][index])
        if not write and nbytes < given:
            flat[nbytes:].zero_()             # padding past the used prefix
        fd, base = self._fds[kind], self._offsets[kind][index]
        # The whole 4 KiB blocks of an aligned tensor (`host_empty`) move straight between it and
        # the disk; the rest (an unaligned tensor, a tail shorter than a block) goes through this
        # thread's aligned buffer.
        pos = 0
        try:
            if not self.direct or flat.data_ptr() % ALIGN == 0:
                direct_end = nbytes if not self.direct else nbytes // ALIGN * ALIGN
                while pos < direct_end:
                    n = min(PIECE, direct_end - pos)
                    # raw memory, not .numpy(): a tensor once seen by numpy can never be resized
                    # again, and chunk payloads are freed by resizing their storage to nothing
                    piece = (ctypes.c_char * n).from_address(flat.data_ptr() + pos)
                    done = os.pwritev(fd, [piece], base + pos) if write else os.preadv(fd, [piece], base + pos)
                    if done != n:
                        raise OSError(f"short {'write' if write else 'read'} of {kind}[{index}]: {done} of {n} bytes")
                    pos += n
            buf = self._bounce(min(BOUNCE, _round_up(nbytes - pos))) if pos < nbytes else None
            while pos < nbytes:
                n = min(BOUNCE, nbytes - pos)
                size = _round_up(n) if self.direct else n
                piece = buf[:size]
                if write:
                    piece[:n].copy_(flat[pos:pos + n])
                    done = os.pwritev(fd, [piece.numpy()], base + pos)
                else:
                    done = os.preadv(fd, [piece.numpy()], base + pos)
                    flat[pos:pos + n].copy_(piece[:n])
                if done != size:
                    raise OSError(f"short {'write' if write else 'read'} of {kind}[{index}]: {done} of {size} "
                                  f"bytes")
                pos += n
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise LoomError(f"{self.setting} {self.folder}: the disk is full") from None
            raise
        if self.drop_cache and not self.direct and not write:
            self.drop_pages(kind, base, nbytes)         # read once per pass: keep no copy
        if write:
            with self._count:
                self.bytes_written += nbytes
        else:
            self.count_read(nbytes)

    def slot(self, kind: str, index: int) -> tuple[int, int]:
        """(offset in the kind's file, bytes kept) of slot `index`."""
        kind = self.aliases.get(kind, kind)
        return self._offsets[kind][index], self._keep[kind][index]

    def map(self, kind: str) -> torch.Tensor:
        """The kind's whole file mapped into memory as a uint8 tensor; nothing is read until its
        pages are touched (`populate`). Reading slots this way, the page cache's pages are the
        tensor's: no copy into buffers of the process's own, which on 2 cores takes a core from the
        computing (`core.inference.stream`). Shared, not private: a private writable mapping is
        charged in full against the kernel's commit limit, and one of a 24 GiB OPT-13B file was
        refused on this 24 GiB machine (ENOMEM); the file is this store's own scratch copy."""
        kind = self.aliases.get(kind, kind)
        size = self._offsets[kind][-1]
        if size == 0:
            return torch.empty(0, dtype=torch.uint8)
        import mmap
        import warnings

        mapped = mmap.mmap(self._fds[kind], size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # the tensor keeps the mapping alive
            return torch.frombuffer(mapped, dtype=torch.uint8)

    def count_read(self, nbytes: int) -> None:
        with self._count:
            self.bytes_read += nbytes

    def drop_pages(self, kind: str, start: int, nbytes: int) -> None:
        """Let the page cache forget bytes start..start+nbytes of the kind's file (once unmapped)."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fds[self.aliases.get(kind, kind)], start, nbytes, os.POSIX_FADV_DONTNEED)

    def write(self, kind: str, index: int, src: torch.Tensor) -> None:
        self._io(True, kind, index, src.contiguous())

    def read(self, kind: str, index: int, dst: torch.Tensor) -> None:
        if not dst.is_contiguous():
            raise ValueError("NVMe reads need a contiguous destination")
        self._io(False, kind, index, dst)

    def close(self) -> None:
        """Close and delete the files (and the folder, when that leaves it empty): they are scratch
        space, and what a later run needs is in the checkpoints. On a disk with tens of GB of
        states a finished run must not leave them behind."""
        super().close()
        for kind, fd in self._fds.items():
            os.close(fd)
            (self.folder / f"{kind}.bin").unlink(missing_ok=True)
        self._fds.clear()
        self._remove_folder()

    def _remove_folder(self) -> None:
        try:
            self.folder.rmdir()
        except OSError:
            pass                                   # not empty (something else lives there) or gone
