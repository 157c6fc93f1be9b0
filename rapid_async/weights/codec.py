"""Weight payloads: lossless deltas and snapshots of a flat inference-dtype buffer.

Used by the learner's publisher (`extract_delta` on the training device, then
`pack_*` on the host) and by the actor's receiver (`read_header` and
`unpack_delta` / `snapshot_data`, checked before anything is decompressed).

Delta encoding (chosen by measurement at Qwen2.5-0.5B's shape, see
benchmarks/results/weights-0.5b-cpu.md). Let b_i and b'_i be the old and new
bit patterns of element i (same-width integers). The change set is
{(i, s_i) : s_i != 0} with s_i = (b'_i - b_i) mod 2^w. After a small optimizer
step most elements keep their bits, and a changed bf16 value mostly moves by
one unit in the last place, so s_i is mostly +-1 (an XOR would spread the same
change over carry chains 0x1, 0x3, 0x7, ...). Three streams, each one zstd
frame:

    gaps    (k,) uint8: positions as gaps g_j = i_j - i_{j-1} - 1 (i_{-1} = -1),
            255 meaning "see the next large gap"
    large   (L,) int64: the gaps >= 255, in order
    values  (w * k,) bytes: zigzag(s_i) as w-byte integers, byte planes
            (all low bytes, then all next bytes...)

Extraction, gap coding and zigzag run as tensor ops on the buffer's device;
only these streams cross to the host, where zstd compresses them.

Payload layout (`WeightUpdate.payload`):

    b"RPW2" | header length: u32 | msgpack header | stream 0 | stream 1 | ...

The header declares everything needed to refuse a payload before any
decompression: kind, layout hash (and for a snapshot the whole layout, its
per-tensor digests and the sha256 of its data), the change count k and large
gap count L of a delta, and for every stream its codec ("raw" / "zstd"), raw
size and stored size. So a delta decompresses to at most
(1 + w + 8/255) bytes per element of the model (every element changed). `read_header` checks that the sizes add up to the
payload and are exactly what k, L and the layout imply, and a zstd frame is
decompressed only if its own declared content size equals the header's.

`entropy_bound_bits` defines the bound reported beside every delta.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

import msgpack
import torch
import zstandard

from rapid_async.weights.layout import Layout

MAGIC = b"RPW2"
_PREFIX = struct.Struct("<4sI")
MAX_HEADER_BYTES = 8 << 20
ZSTD_LEVEL = 3
ZSTD_THREADS = max(1, min(8, os.cpu_count() or 1))
_CHUNK = 1 << 26
"""Elements compared per step of `extract_delta` (bounds its temporaries)."""


class PayloadError(ValueError):
    """A weight payload that is malformed or does not fit the receiver's model."""


@dataclass
class Delta:
    """The change between two flat buffers, as positions and differences.

    Attributes:
        idx: (k,) int64 sorted flat positions that changed.
        diff: (k,) integers of the buffer's width: (new - old) bits, wrapping.
    """

    idx: torch.Tensor
    diff: torch.Tensor


# ---------------------------------------------------------------- symbols


def _wide(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    """The wider integer type used for wrapping arithmetic, and the bit mask."""
    return (torch.int32, 0xFFFF) if dtype == torch.int16 else (torch.int64, 0xFFFF_FFFF)


def wrap_sub(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """(new - old) mod 2^w, as the same w-bit integer dtype."""
    wide, _ = _wide(new.dtype)
    return (new.to(wide) - old.to(wide)).to(new.dtype)


def wrap_add(old: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """(old + diff) mod 2^w, as the same w-bit integer dtype."""
    wide, _ = _wide(old.dtype)
    return (old.to(wide) + diff.to(wide)).to(old.dtype)


def zigzag(diff: torch.Tensor) -> torch.Tensor:
    """Signed w-bit -> unsigned w-bit pattern (0, -1, 1, -2 ... -> 0, 1, 2, 3 ...)."""
    wide, mask = _wide(diff.dtype)
    d = diff.to(wide)
    bits = 8 * diff.element_size()
    return (((d << 1) ^ (d >> (bits - 1))) & mask).to(diff.dtype)


def unzigzag(z: torch.Tensor) -> torch.Tensor:
    """Inverse of `zigzag`."""
    wide, mask = _wide(z.dtype)
    u = z.to(wide) & mask
    return ((u >> 1) ^ -(u & 1)).to(z.dtype)


def entropy_bound_bits(n: int, diff: torch.Tensor) -> float:
    """Zero-order entropy bound of a delta's change set, in bits.

    With s_i = (new bits - old bits) mod 2^w for each of the n elements of the
    state (0 where unchanged) and f(s) the frequency of symbol s among the n,
    the bound is sum_i -log2 f(s_i) = n * H(f): the fewest bits any code can
    use that codes each element's symbol on its own with one fixed code for
    the whole delta (it equals n * h(k/n) + k * H(nonzero symbols), positions
    plus values). Coders that exploit neighbours could go below it.

    Args:
        n: number of elements in the state.
        diff: (k,) the nonzero symbols s_i of the changed elements.
    """
    k = diff.numel()
    if k == 0 or n == 0:
        return 0.0
    if diff.dtype == torch.int16:
        counts = torch.bincount(diff.to(torch.int32) & 0xFFFF, minlength=1 << 16)
        counts = counts[counts > 0]
    else:
        counts = torch.unique(diff, return_counts=True)[1]
    c = counts.double()
    zeros = n - k
    total = n * math.log2(n) - float((c * torch.log2(c)).sum())
    if zeros:
        total -= zeros * math.log2(zeros)
    return total


# ---------------------------------------------------------------- device side


def extract_delta(old: torch.Tensor, new: torch.Tensor) -> Delta:
    """Positions and differences where two flat integer views differ.

    Args:
        old, new: (n,) integer views (same dtype, same device) of two buffers.
    """
    idx, diff = [], []
    for start in range(0, new.numel(), _CHUNK):
        a, b = old[start:start + _CHUNK], new[start:start + _CHUNK]
        where = torch.nonzero(a != b).squeeze(1)  # (k_c,)
        idx.append(where + start)
        diff.append(wrap_sub(b[where], a[where]))
    if not idx:
        return Delta(torch.zeros(0, dtype=torch.int64, device=new.device), new[:0].clone())
    return Delta(torch.cat(idx), torch.cat(diff))


def delta_streams(delta: Delta) -> dict[str, torch.Tensor]:
    """The three uint8 / int64 streams of a delta, still on its device."""
    prev = torch.cat([torch.full((1,), -1, dtype=torch.int64, device=delta.idx.device), delta.idx[:-1]])
    gaps = delta.idx - prev - 1  # (k,)
    width = delta.diff.element_size()
    values = zigzag(delta.diff).view(torch.uint8).view(-1, width).t().contiguous()  # (w, k)
    return {"gaps": gaps.clamp(max=255).to(torch.uint8), "large": gaps[gaps >= 255],
            "values": values.reshape(-1)}


def decode_streams(gaps: torch.Tensor, large: torch.Tensor, values: torch.Tensor,
                   int_dtype: torch.dtype, numel: int) -> Delta:
    """Inverse of `delta_streams`; PayloadError if positions leave [0, numel).

    Args:
        gaps: (k,) uint8; large: (L,) int64; values: (w * k,) uint8; all on
            the device the delta will be applied on.
    """
    k = gaps.numel()
    g = gaps.to(torch.int64)
    escape = gaps == 255
    if int(escape.sum()) != large.numel():
        raise PayloadError(f"delta has {int(escape.sum())} escaped gaps but {large.numel()} large gaps")
    if large.numel() and bool((large < 255).any()):
        raise PayloadError("delta has a large gap below 255 (or negative)")
    # Positions rise strictly (each step g + 1 >= 1) unless the int64 cumsum
    # wraps, which forged large gaps can make it do, landing back in range.
    # It cannot wrap while the large gaps add up to less than 2**62 (the small
    # ones add < 256 k): bound that first, in float64, over the L large gaps.
    if large.numel() and float(large.double().sum()) + 256.0 * k > 2.0**62:
        raise PayloadError(f"delta changes positions far past the {numel} elements "
                           f"(its large gaps add up to {float(large.double().sum()):.3g})")
    g[escape] = large
    idx = torch.cumsum(g + 1, 0) - 1
    if k and (int(idx[0]) < 0 or int(idx[-1]) >= numel):
        raise PayloadError(f"delta changes position {int(idx[-1])} of a state of {numel} elements")
    if k == 0:
        return Delta(idx, torch.zeros(0, dtype=int_dtype, device=gaps.device))
    width = torch.empty((), dtype=int_dtype).element_size()
    z = values.view(width, k).t().reshape(-1).contiguous().view(int_dtype)
    return Delta(idx, unzigzag(z))


# ---------------------------------------------------------------- host side


def _compress(data: torch.Tensor) -> bytes:
    raw = data.contiguous().cpu().numpy().tobytes()
    threads = ZSTD_THREADS if len(raw) > (8 << 20) else 0
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=threads, write_checksum=True,
                                    write_content_size=True).compress(raw)


def _payload(header: dict, streams: list[tuple[str, str, int, bytes]]) -> bytes:
    header["streams"] = [[name, codec, raw, len(data)] for name, codec, raw, data in streams]
    packed = msgpack.packb(header, use_bin_type=True)
    return b"".join([_PREFIX.pack(MAGIC, len(packed)), packed] + [data for *_, data in streams])


def pack_delta(delta: Delta, layout: Layout) -> tuple[bytes, int]:
    """A delta payload; returns (payload, raw bytes of its streams before zstd)."""
    streams = delta_streams(delta)
    parts = [(name, "zstd", t.numel() * t.element_size(), _compress(t)) for name, t in streams.items()]
    header = {"kind": "delta", "layout_hash": layout.hash(), "count": delta.idx.numel(),
              "large": streams["large"].numel()}
    return _payload(header, parts), sum(raw for _, _, raw, _ in parts)


def pack_snapshot(data: bytes, layout: Layout, digests: list[int], sha256: str) -> bytes:
    """A snapshot payload: the raw flat buffer, its layout, digests and sha256."""
    header = {"kind": "snapshot", "layout_hash": layout.hash(), "layout": layout.to_wire(),
              "digests": digests, "sha256": sha256}
    return _payload(header, [("data", "raw", len(data), data)])


@dataclass
class Header:
    """A checked payload header.

    Attributes:
        fields: the msgpack header (kind, layout_hash, ...).
        streams: name -> (codec, raw size, memoryview of the stored bytes).
    """

    fields: dict
    streams: dict[str, tuple[str, int, memoryview]]


_DELTA_STREAMS = ("gaps", "large", "values")


def read_header(payload: bytes, kind: str) -> Header:
    """Parse and check a payload's prefix and header; nothing is decompressed.

    Raises:
        PayloadError: on a bad prefix, header, stream table or sizes that do
            not add up to the payload.
    """
    view = memoryview(payload)
    if len(view) < _PREFIX.size or bytes(view[:4]) != MAGIC:
        raise PayloadError(f"payload does not start with {MAGIC!r}")
    _, size = _PREFIX.unpack_from(view)
    if size > MAX_HEADER_BYTES or _PREFIX.size + size > len(view):
        raise PayloadError(f"payload header of {size} bytes does not fit ({len(view)} bytes in all)")
    try:
        fields = msgpack.unpackb(view[_PREFIX.size:_PREFIX.size + size], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise PayloadError(f"payload header is not msgpack ({type(exc).__name__})") from exc
    if not isinstance(fields, dict) or fields.get("kind") != kind:
        raise PayloadError(f"payload header is not a {kind} header")
    names = ("data",) if kind == "snapshot" else _DELTA_STREAMS
    table = fields.get("streams")
    if not isinstance(table, list) or [row[0] if isinstance(row, list) else None for row in table] != list(names):
        raise PayloadError(f"payload streams must be {list(names)}")
    streams, offset = {}, _PREFIX.size + size
    for row in table:
        if len(row) != 4 or row[1] not in ("raw", "zstd") or not all(
                type(v) is int and v >= 0 for v in row[2:]):
            raise PayloadError(f"payload stream entry {str(row)[:80]} is malformed")
        name, codec, raw, stored = row
        if codec == "raw" and raw != stored:
            raise PayloadError(f"raw stream {name!r} declares {raw} bytes but stores {stored}")
        streams[name] = (codec, raw, view[offset:offset + stored])
        offset += stored
    if offset != len(view):
        raise PayloadError(f"payload is {len(view)} bytes, its header accounts for {offset}")
    return Header(fields, streams)


def check_delta_sizes(header: Header, layout: Layout) -> tuple[int, int]:
    """(k, L) of a delta header, checked against the layout; PayloadError otherwise."""
    k, large = header.fields.get("count"), header.fields.get("large")
    # Each large gap skips >= 255 positions, so there are at most numel / 255 of them.
    if (type(k) is not int or type(large) is not int or not 0 <= k <= layout.numel
            or not 0 <= large <= min(k, layout.numel // 255 + 1)):
        raise PayloadError(f"delta declares {k} changes and {large} large gaps; the model has "
                           f"{layout.numel} elements")
    want = {"gaps": k, "large": 8 * large, "values": layout.width * k}
    for name, size in want.items():
        if header.streams[name][1] != size:
            raise PayloadError(f"delta stream {name!r} declares {header.streams[name][1]} bytes, "
                               f"{k} changes need {size}")
    return k, large


def stream_bytes(header: Header, name: str) -> bytes | memoryview:
    """One stream's raw bytes; zstd output is bounded by the declared raw size."""
    codec, raw, stored = header.streams[name]
    if codec == "raw":
        return stored
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"stream {name!r} is not a zstd frame") from exc
    if declared != raw:
        raise PayloadError(f"stream {name!r}: its zstd frame declares {declared} bytes, the header {raw}")
    try:
        out = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"stream {name!r} is corrupt or truncated ({exc})") from exc
    if len(out) != raw:
        raise PayloadError(f"stream {name!r} holds {len(out)} bytes, declared {raw}")
    return out


def unpack_delta(header: Header, layout: Layout, device: torch.device) -> Delta:
    """Decompress and decode a checked delta header onto `device`."""
    k, large = check_delta_sizes(header, layout)

    def tensor(name: str, dtype: torch.dtype) -> torch.Tensor:
        data = stream_bytes(header, name)
        if not len(data):
            return torch.zeros(0, dtype=dtype, device=device)
        return torch.frombuffer(bytearray(data), dtype=dtype).to(device)

    return decode_streams(tensor("gaps", torch.uint8), tensor("large", torch.int64),
                          tensor("values", torch.uint8), layout.int_dtype, layout.numel)
