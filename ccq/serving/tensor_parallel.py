"""Tensor-parallel pieces of a packed tensor, cut along 16x16 tile boundaries.

A column-parallel layer (q/k/v, gate/up, the experts' gate_up) gives each rank a range of
output rows; a row-parallel layer (o_proj, down_proj, the experts' down) gives each rank a
range of input columns and sums the ranks' partial outputs. Every range must be a whole
number of 16-wide tiles: a split that cuts a tile is refused.

Input side. The kernels multiply the rotated activation x' = H(s * x), and the block
Hadamard H mixes the features of each `had_in` block (up to 512). A rank that owns columns
[start, stop) of a row-parallel weight therefore keeps the packed columns of every block
that range touches, [lo, hi), and feeds zeros for the columns it does not own:
sum over ranks of W'[:, lo:hi] H(s * x_own) = W' H(s * x). Nothing is re-encoded; a rank
stores at most one partial block on each side more than its share.

Output side. Rows are independent unless the checkpoint rotates outputs too
(`rotate_output`); then a split must fall on `had_out` block boundaries.

Fused experts [E, out, in] are split by whole experts instead: each rank holds E/tp experts
with their full intermediate width and computes the tokens routed to them; the ranks' partial
outputs are summed by the same all-reduce that sums intermediate-split partials. Splitting
the intermediate (1536 for the ERNIE 28B text experts, 512-wide Hadamard blocks) would make
every rank keep whole blocks, up to 2/3 of all experts at tp=4; whole experts cost nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codec.hadamard import hadamard_block_size
from ..codec.tensor import META_FIELDS, TILE, packed_nbytes


def pad16(n: int) -> int:
    return -(-n // TILE) * TILE


@dataclass(frozen=True)
class Span:
    """The part of one dimension a rank owns, [start, stop), and stores, [lo, hi)."""

    start: int
    stop: int
    lo: int
    hi: int
    whole: bool = False  # no split: the packed tensor is used as stored

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def stored(self) -> int:
        return self.hi - self.lo

    @property
    def before(self) -> int:
        """Zero features fed before the rank's own input columns."""
        return self.start - self.lo

    @property
    def after(self) -> int:
        return self.hi - self.stop


def split(full: int, parts: int, index: int, block: int = TILE, *, name: str = "tensor",
          what: str = "rows") -> Span:
    """Piece `index` of `parts` of a dimension of `full` features, widened to `block` boundaries."""
    if parts == 1:
        return Span(0, full, 0, pad16(full), whole=True)
    if full % parts or (full // parts) % TILE:
        raise ValueError(f"{name}: tensor-parallel size {parts} splits its {full} {what} into pieces of "
                         f"{full / parts:g}, which cuts a 16x16 tile (each piece must be a multiple of 16)")
    n = full // parts
    start = index * n
    return Span(start, start + n, start // block * block, -(-(start + n) // block) * block)


def check_output_split(span: Span, had_out: int, name: str) -> None:
    """With output rotation a row range must hold whole `had_out` blocks."""
    if not span.whole and had_out and (span.start % had_out or span.stop % had_out):
        raise ValueError(f"{name}: this split cuts its {had_out}-row output Hadamard block (rows {span.start}.."
                         f"{span.stop}); use a tensor-parallel size that keeps whole blocks, or a checkpoint "
                         "quantized without rotate_output")


def block_of(features: int, hadamard_block: int) -> int:
    """The Hadamard block the quantizer chose for a side of `features` (had_in, or had_out)."""
    return hadamard_block_size(pad16(features), hadamard_block)


def with_meta(meta: torch.Tensor, **fields) -> torch.Tensor:
    m = meta.clone()
    for k, v in fields.items():
        m[META_FIELDS.index(k.rstrip("_"))] = v
    return m


def column_piece(field: str, t: torch.Tensor, rows: Span) -> torch.Tensor:
    """The rows [lo, hi) of packed field `field` of a [(E,) out, in] tensor."""
    if rows.whole:
        return t
    if field == "trellis":
        return t.narrow(-3, rows.lo // TILE, rows.stored // TILE)
    if field in ("scales", "signs_out"):
        return t.narrow(-1, rows.lo, rows.stored)
    if field == "meta":
        return with_meta(t, out=rows.size)
    return t


def row_piece(field: str, t: torch.Tensor, cols: Span) -> torch.Tensor:
    """The input columns [lo, hi) of packed field `field` of a [(E,) out, in] tensor."""
    if cols.whole:
        return t
    if field == "trellis":
        return t.narrow(-2, cols.lo // TILE, cols.stored // TILE)
    if field == "signs_in":
        return t.narrow(-1, cols.lo, cols.stored)
    if field == "meta":
        return with_meta(t, in_=cols.stored)
    return t


def expert_range(num_experts: int, parts: int, index: int, name: str = "experts") -> tuple[int, int]:
    """(first expert, count) of rank `index` of `parts`."""
    if num_experts % parts:
        raise ValueError(f"{name}: tensor-parallel size {parts} does not divide its {num_experts} experts "
                         "(ccq splits fused experts by whole experts)")
    n = num_experts // parts
    return index * n, n


def expert_piece(field: str, t: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Experts [first, first + count) of packed field `field` of an [E, out, in] stack."""
    if field in ("trellis", "scales"):
        return t if count == t.shape[0] else t.narrow(0, first, count)
    if field == "meta":
        return with_meta(t, experts=count)
    return t  # the sign vectors are shared by all experts


def rank_nbytes(kind: str, shape: tuple[int, ...], bits: int, span: Span, rotate_output: bool = False) -> int:
    """Packed bytes one rank holds of a tensor of dense `shape` split as `kind`.

    kind: "column" (span over rows), "row" (span over input columns), "replicated".
    """
    *lead, out, inp = shape
    if kind == "replicated" or span.whole:
        local = shape
    elif kind == "column":
        local = (*lead, span.stored, inp)
    elif kind == "row":
        local = (*lead, out, span.stored)
    else:
        raise ValueError(f"unknown tensor-parallel kind {kind!r}")
    return packed_nbytes(tuple(local), bits, rotate_output)
