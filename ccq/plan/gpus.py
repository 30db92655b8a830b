"""Parse GPU specs like `1x141GB`, `4x80GB`, `2x80GB+1x24GiB` and byte sizes like `512MiB`.

GB/MB/TB are decimal (vendors quote memory this way: an H200 is "141 GB"), GiB/MiB/TiB
binary; a bare number is bytes.
"""

from __future__ import annotations

import re

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_GPUS = re.compile(r"^\s*(\d+)\s*[x\*]\s*(.+)$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'80GB' -> 80_000_000_000; '512MiB' -> 536_870_912."""
    m = _SIZE.match(str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"size {text!r} does not parse: use a number with GB, GiB, MB, MiB, TB or TiB (e.g. 80GB)")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def parse_gpus(spec: str) -> list[int]:
    """'4x80GB' -> [80e9] * 4; parts joined by '+' are concatenated in order."""
    out = []
    for part in str(spec).split("+"):
        m = _GPUS.match(part)
        if not m:
            raise ValueError(f"GPU spec {spec!r} does not parse: use NxSIZE such as 1x141GB, 4x80GB or 2x80GB+1x24GB")
        try:
            if not re.search(r"[a-z]\s*$", m.group(2), re.IGNORECASE):
                raise ValueError
            size = parse_size(m.group(2))
        except ValueError:
            raise ValueError(f"GPU spec {spec!r} does not parse: size {m.group(2)!r} needs a unit "
                             "(GB, GiB, MB, MiB, TB, TiB)") from None
        n = int(m.group(1))
        if n < 1 or size <= 0:
            raise ValueError(f"GPU spec {spec!r}: need at least one GPU of a positive size")
        out += [size] * n
    return out
