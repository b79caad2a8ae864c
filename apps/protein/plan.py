"""Chunk sizes for Loom's Evoformer from a memory budget (in the spirit of AutoChunk, arXiv
2401.10652: estimate each operation's activation memory at this sequence length, then take the
largest blocks that keep the peak under the budget).

The estimate counts, per rank, the tensors `apps.protein.evoformer` allocates: the caller's m and
z (held throughout), this rank's parts and the gathered operands under axial parallelism, and for
each operation the temporaries of one block. The peak is the held memory plus the largest
operation's temporaries. Among the plans that fit, the one with the fewest block steps wins
(larger blocks run faster).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from core.errors import LoomError

GIB = 1 << 30


@dataclass(frozen=True)
class Plan:
    """Chunk sizes: rows of z (or of m^T) per step, MSA rows per step in row attention, queries per
    attention step, channels per triangle-multiplication step, and the strips of rows the
    triangle multiplication's product is made in (one process; 1 = the whole product at once),
    and whether the updates that wait for a later strip go to a file (`spill`) instead of memory."""

    rows: int
    msa_rows: int
    queries: int
    channels: int
    strips: int = 1
    spill: bool = False


@dataclass(frozen=True)
class Shapes:
    """What the estimate needs about one stack at one call."""

    s: int                 # MSA rows
    n: int                 # residues
    c_m: int
    c_z: int
    heads_msa: int
    c_att: int             # per-head channels of MSA attention
    c_opm: int
    c_mul: int
    heads_pair: int
    c_pair_att: int
    transition_n: int
    extra: bool            # global column attention (extra-MSA stack)
    ranks: int = 1
    bytes_per: int = 4
    pair_split: bool = False   # the caller holds only this rank's rows of z (apps.protein.axial.PairRows)
    pair_bytes_per: int = 0    # z's element size where it differs (model.pair_dtype); 0: bytes_per


def _pow2_upto(n: int) -> list[int]:
    out, v = [], 1
    while v < n:
        out.append(v)
        v *= 2
    return out + [max(1, n)]


def held_bytes(sh: Shapes) -> int:
    """What stays allocated during the whole stack (per rank)."""
    p = sh.ranks
    n_loc, s_loc = -(-sh.n // p), -(-sh.s // p)
    whole = sh.s * sh.n * sh.c_m + sh.s * sh.n + sh.n * sh.n            # the caller's m, the masks
    pair = sh.n * sh.n * sh.c_z if p == 1 or not sh.pair_split else 0   # ... and its z
    local = 0 if p == 1 else s_loc * sh.n * sh.c_m
    local_pair = 0 if p == 1 else n_loc * sh.n * sh.c_z
    return (whole + local) * sh.bytes_per + (pair + local_pair) * (sh.pair_bytes_per or sh.bytes_per)


def op_bytes(sh: Shapes, plan: Plan) -> dict[str, int]:
    """Temporaries of each operation with the blocks of `plan` (per rank)."""
    p, e = sh.ranks, sh.bytes_per
    n, s = sh.n, sh.s
    n_loc, s_loc = -(-n // p), -(-s // p)
    r, q, rm, cb = min(plan.rows, n_loc), min(plan.queries, n), min(plan.msa_rows, s_loc), min(plan.channels, sh.c_mul)
    hm, dm, hp, dp = sh.heads_msa, sh.c_att, sh.heads_pair, sh.c_pair_att

    def attention(rows: int, length: int, c_in: int, h: int, d: int, bias: int) -> int:
        per_block = rows * length * (c_in + 2 * h * d) + rows * q * (4 * h * d + c_in) + 2 * rows * h * q * length
        return bias + per_block

    def pair_bias(h: int) -> int:
        if p == 1:                     # written in place, a block of rows at a time
            return h * n * n + r * n * (sh.c_z + 2 * h)
        return h * n * n + n_loc * n * h + r * n * (sh.c_z + h)           # gathered, this rank's part, a block

    rows_temp = r * n * (sh.c_z + 3 * cb) + r * n * (2 * sh.c_z + sh.c_mul)
    if p == 1 and plan.strips > 1:
        tri_mul = rows_temp + max(_strip_bytes(sh, plan, s0, s1) for s0, s1 in strip_spans(n, plan.strips))
    else:
        tri_mul = sh.c_mul * n_loc * n + 2 * cb * n_loc * n + (cb * n * n if p > 1 else 0) + rows_temp
    out = {
        "msa_row_attention": attention(rm, n, sh.c_m, hm, dm, pair_bias(hm)),
        "msa_transition": r * s * sh.c_m * (1 + 2 * sh.transition_n),
        "outer_product_mean": s * n_loc * sh.c_m + 2 * s * n_loc * sh.c_opm + s * n * sh.c_opm
                              + r * n * (sh.c_opm ** 2 + sh.c_z + 1),
        "triangle_multiplication": tri_mul,
        "triangle_attention": attention(r, n, sh.c_z, hp, dp, pair_bias(hp)),
        "pair_transition": r * n * sh.c_z * (1 + 2 * sh.transition_n),
        "transpose": 2 * r * r * sh.c_z + (2 * n_loc * n_loc * sh.c_z if p > 1 else 0),   # tiles sent, received
    }
    if sh.extra:
        out["msa_column_attention"] = r * s * (sh.c_m + 2 * sh.c_att + 2 * hm * sh.c_att)
    else:
        out["msa_column_attention"] = attention(r, s, sh.c_m, hm, dm, 0)
    if p > 1:
        out["msa_swap"] = 3 * s_loc * n * sh.c_m + 3 * s * n_loc * sh.c_m
    return {k: v * e for k, v in out.items()}


def blocks(n: int, size: int):
    """(start, stop) of consecutive pieces of range(n), `size` long (the last one shorter)."""
    size = max(1, size)
    for start in range(0, n, size):
        yield start, min(start + size, n)


def strip_spans(n: int, strips: int) -> list[tuple[int, int]]:
    """The rows of each strip of the triangle multiplication (the last one may be shorter)."""
    return list(blocks(n, -(-n // strips)))


def _strip_bytes(sh: Shapes, plan: Plan, s0: int, s1: int) -> int:
    """Elements held during step [s0, s1) of the strip triangle multiplication: the waiting updates
    of rows >= s0 at columns < s0 (spilled: one tile being written or read, and the file store's
    aligned copy of it), the two product parts and one channel block's projections."""
    n, cb = sh.n, min(plan.channels, sh.c_mul)
    side = -(-n // plan.strips)
    waiting = 3 * side * side * sh.c_z if plan.spill else (n - s0) * s0 * sh.c_z
    return (waiting + sh.c_mul * (s1 - s0) * (n - s0) + sh.c_mul * (n - s1) * (s1 - s0)
            + 2 * cb * (n - s0) * n)


# The host heap's slack, which no per-tensor count sees: the holes small temporaries leave inside
# an operation, and what a trim between operations does not give back (measured at 384 and 512
# residues with AlphaFold's channels: up to 4 MiB above an operation's estimate, 4.6 MiB between).
HEAP_SLACK = 8 << 20


def peak_bytes(sh: Shapes, plan: Plan) -> int:
    return held_bytes(sh) + max(op_bytes(sh, plan).values()) + HEAP_SLACK


def _steps(sh: Shapes, plan: Plan) -> float:
    n_loc, s_loc = -(-sh.n // sh.ranks), -(-sh.s // sh.ranks)
    rows = -(-n_loc // plan.rows)
    return (rows * -(-sh.n // plan.queries) * 4 + -(-s_loc // plan.msa_rows) * -(-sh.n // plan.queries)
            + rows * -(-sh.c_mul // plan.channels) * 2 * (plan.strips + 1) / 2)   # strips: projections redone


MAX_STRIPS = 32


def smallest(sh: Shapes, spill: bool = False) -> Plan:
    one = sh.ranks == 1
    return Plan(rows=1, msa_rows=1, queries=min(sh.n, 16), channels=1, strips=MAX_STRIPS if one else 1,
                spill=spill and one)


def choose(sh: Shapes, budget: int, prefer: int | None = None, spill: bool = False, outside: int = 0) -> Plan:
    """The plan with the fewest steps whose peak stays within `budget` bytes, and, where one can,
    whose largest block's temporaries exceed what the smallest blocks need by at most `prefer`
    bytes (on a CPU, huge temporaries are slower than several cache-sized ones: each allocation is
    fresh pages; and blocks sized to the rows a process holds let more processes hold less); a
    `LoomError` naming the longest sequence that would fit when none does (`what_fits`;
    `outside`: what the process holds besides the stack, for the floor it names). `spill`: the
    waiting updates of the strip triangle multiplication may go to a file, where nothing fits with
    them in memory."""
    n_loc, s_loc = -(-sh.n // sh.ranks), -(-sh.s // sh.ranks)
    if prefer is not None:
        # `prefer` counts beyond what the smallest blocks need (the whole triangle product, where
        # it is not made in strips): no plan goes below that, and a preference under it would rule
        # out every plan and leave the fewest steps, the largest blocks, to win.
        prefer += max(op_bytes(sh, replace(smallest(sh), strips=1, spill=False)).values())
    best, best_key = None, None
    # More strips only where the whole product does not fit (they redo the projections); a file
    # for the waiting updates only where no number of strips fits in memory.
    ways = [(1, False)]
    if sh.ranks == 1:
        more = [v for v in _pow2_upto(MAX_STRIPS) if v > 1]
        ways += [(v, False) for v in more] + ([(v, True) for v in more] if spill else [])
    for strips, spilled in ways:
        for rows in _pow2_upto(n_loc):
            for queries in _pow2_upto(sh.n):
                if queries < min(sh.n, 16) and queries != sh.n:
                    continue                       # attention with very few queries is all overhead
                for channels in _pow2_upto(sh.c_mul):
                    for msa_rows in _pow2_upto(s_loc):
                        plan = Plan(rows, msa_rows, queries, channels, strips, spilled)
                        temporaries = max(op_bytes(sh, plan).values())
                        if held_bytes(sh) + temporaries + HEAP_SLACK > budget:
                            continue
                        key = (prefer is not None and temporaries > prefer, _steps(sh, plan))
                        if best_key is None or key < best_key:
                            best, best_key = plan, key
        if best is not None:
            break
    if best is None:
        hint = ""
        if sh.ranks == 1 and not spill and longest(sh, budget, spill=True) > longest(sh, budget):
            hint = (f" (about {longest(sh, budget, spill=True)} with memory.spill_dir set to a folder on a local disk, "
                    f"where the triangle multiplication then keeps the updates that wait for later rows)")
        raise LoomError(f"a {sh.n}-residue sequence does not fit: the Evoformer needs about "
                        f"{peak_bytes(sh, smallest(sh, spill)) / GIB:.2f} GiB even in the smallest blocks and "
                        f"{max(budget, 0) / GIB:.2f} GiB of the memory budget is left for it; "
                        f"{what_fits(sh, budget, spill, outside)}{hint}. Raise memory.budget_gb, run on more "
                        f"processes (torchrun: axial parallelism) or use model.dtype=bfloat16")
    return best


def what_fits(sh: Shapes, budget: int, spill: bool = False, outside: int = 0) -> str:
    """For a refusal: the longest sequence whose stack fits `budget` bytes per process on this
    many processes and on twice as many (axial parallelism: each holds its rows of z), or, where
    not even one residue does, the floor: what the smallest run needs, `outside` (what the process
    holds besides the stack: weights, inputs, the runtime) included."""
    def procs(p: int) -> str:
        return "1 process" if p == 1 else f"{p} processes"

    n = longest(sh, budget, spill)
    more = longest(replace(sh, ranks=2 * sh.ranks, pair_split=True), budget)
    if n:
        return (f"the longest sequence that fits is about {n} residues on {procs(sh.ranks)} (about {more} on "
                f"{procs(2 * sh.ranks)}, each with this budget)")
    one = replace(sh, n=1)
    floor = outside + peak_bytes(one, smallest(one, spill))
    return f"no sequence fits: even a 1-residue one needs about {floor / GIB:.2f} GiB"


def longest(sh: Shapes, budget: int, spill: bool = False) -> int:
    """The longest sequence that fits `budget` with the smallest blocks (bisection)."""
    def fits(n: int) -> bool:
        at = replace(sh, n=n)
        return peak_bytes(at, smallest(at, spill)) <= budget

    lo, hi = 0, max(sh.n, 1)
    while fits(hi):
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
