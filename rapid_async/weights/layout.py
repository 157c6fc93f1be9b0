"""The inference-dtype weights as one flat buffer, and the layout that names it.

Used by both processes: the learner's publisher keeps its published copies of
the weights as flat buffers on the training device, the actor's receiver
writes updates into the flat buffer its engine reads from. A `Layout` lists
the tensors (name, shape) in order; tensor i occupies elements
[offset_i, offset_i + numel_i) of a 1-D tensor of the inference dtype. Every
floating parameter is cast to that one dtype, so element positions, bit
patterns and digests are defined over a single integer view of the buffer.

Tied parameters (e.g. `lm_head.weight` sharing the embedding) appear once:
`Layout.from_model` follows `model.named_parameters()`, which yields a shared
parameter only under its first name, and both engines accept a tied weight
being left out.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import msgpack
import torch

INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT_OF_WIDTH = {2: torch.int16, 4: torch.int32}
MAX_TENSORS = 1 << 16
"""Most tensors a layout may list (Qwen2.5-0.5B has 290)."""
MAX_ELEMENTS = 1 << 36
"""Most elements a layout may describe (64G; a 3B model has about 3G)."""


def cast_state(state_dict: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of the weights, floating tensors cast to `dtype`.

    Args:
        state_dict: name -> tensor (any device). Non-floating tensors are
            copied unchanged.
        dtype: inference dtype name: "float32", "bfloat16" or "float16".

    Returns:
        name -> new contiguous CPU tensor, sharing no memory with the input.
    """
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not an inference dtype; use one of {sorted(INFERENCE_DTYPES)}")
    target = INFERENCE_DTYPES[dtype]
    out = {}
    for name, tensor in state_dict.items():
        to = target if tensor.is_floating_point() else tensor.dtype
        out[name] = tensor.detach().to(device="cpu", dtype=to, copy=True).contiguous()
    return out


class Layout:
    """Names, shapes and offsets of the tensors in a flat buffer of one dtype.

    Args:
        dtype: inference dtype name (a key of INFERENCE_DTYPES).
        entries: (name, shape) in buffer order; names unique.

    Raises:
        ValueError: naming the entry that is malformed or too large.
    """

    def __init__(self, dtype: str, entries: Iterable[tuple[str, Iterable[int]]]):
        if dtype not in INFERENCE_DTYPES:
            raise ValueError(f"layout dtype {dtype!r} is not one of {sorted(INFERENCE_DTYPES)}")
        self.dtype = dtype
        self.names: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.offsets: list[int] = []
        self.numels: list[int] = []
        self._index: dict[str, int] = {}
        total = 0
        for name, shape in entries:
            shape = tuple(shape)
            if not isinstance(name, str) or not name or name in self._index:
                raise ValueError(f"layout: tensor name {name!r} is empty, not a str or repeated")
            if len(shape) > 8 or not all(type(d) is int and 0 <= d <= MAX_ELEMENTS for d in shape):
                raise ValueError(f"layout: {name!r} has shape {shape!r}; need up to 8 ints >= 0")
            numel = math.prod(shape)
            self.names.append(name)
            self.shapes.append(shape)
            self.offsets.append(total)
            self.numels.append(numel)
            self._index[name] = len(self.names) - 1
            total += numel
            if total > MAX_ELEMENTS or len(self.names) > MAX_TENSORS:
                raise ValueError(f"layout: more than {MAX_ELEMENTS} elements or {MAX_TENSORS} tensors")
        self.numel = total

    @classmethod
    def from_named(cls, named: Iterable[tuple[str, torch.Tensor]], dtype: str) -> Layout:
        """The layout of (name, tensor) pairs, in that order, in `dtype`."""
        return cls(dtype, [(name, tuple(t.shape)) for name, t in named])

    @classmethod
    def from_model(cls, model: torch.nn.Module, dtype: str) -> Layout:
        """The layout of a model's parameters (a tied parameter once, first name)."""
        return cls.from_named(model.named_parameters(), dtype)

    # -- properties
    @property
    def torch_dtype(self) -> torch.dtype:
        return INFERENCE_DTYPES[self.dtype]

    @property
    def width(self) -> int:
        """Bytes per element."""
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def int_dtype(self) -> torch.dtype:
        """The same-width integer dtype through which bit patterns are read."""
        return INT_OF_WIDTH[self.width]

    @property
    def nbytes(self) -> int:
        return self.numel * self.width

    def __len__(self) -> int:
        return len(self.names)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Layout) and self.dtype == other.dtype
                and self.names == other.names and self.shapes == other.shapes)

    def hash(self) -> str:
        """sha256 (hex, 32 chars) of the dtype, names and shapes, in order."""
        return hashlib.sha256(msgpack.packb([self.dtype, self.to_wire()])).hexdigest()[:32]

    # -- wire form (inside weight payloads, see codec.py)
    def to_wire(self) -> list:
        return [[name, list(shape)] for name, shape in zip(self.names, self.shapes)]

    @classmethod
    def from_wire(cls, dtype: object, value: object) -> Layout:
        """Rebuild a layout received in a payload header; ValueError if malformed."""
        if not isinstance(value, list) or len(value) > MAX_TENSORS:
            raise ValueError(f"layout must be a list of at most {MAX_TENSORS} [name, shape] pairs")
        entries = []
        for item in value:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], list)):
                raise ValueError(f"layout entry {str(item)[:80]} is not [name, [dims]]")
            entries.append((item[0], item[1]))
        if not isinstance(dtype, str):
            raise ValueError(f"layout dtype must be a str, got {type(dtype).__name__}")
        return cls(dtype, entries)

    # -- buffers
    def allocate(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """A new uninitialised flat buffer for this layout."""
        return torch.empty(self.numel, dtype=self.torch_dtype, device=device)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> view of `flat` with the tensor's shape (no copy)."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(f"flat buffer has shape {tuple(flat.shape)}, layout needs ({self.numel},)")
        return {name: flat[off:off + n].view(shape)
                for name, shape, off, n in zip(self.names, self.shapes, self.offsets, self.numels)}

    def boundaries(self, device: str | torch.device) -> torch.Tensor:
        """(len + 1,) int64 tensor of start offsets, then the total."""
        return torch.tensor(self.offsets + [self.numel], dtype=torch.int64, device=device)

    def check_fits(self, expected: dict[str, tuple[int, ...]], optional: set[str] = frozenset(),
                   dtype: torch.dtype | None = None) -> None:
        """Raise ValueError unless this layout is exactly what a model holds.

        Args:
            expected: name -> shape of every tensor the model requires.
            optional: names that may be present or not (a tied lm_head.weight).
            dtype: the model's inference dtype, if it must match.
        """
        if dtype is not None and self.torch_dtype != dtype:
            raise ValueError(f"weights are {self.dtype}, the engine runs in {dtype}")
        for name, shape in zip(self.names, self.shapes):
            if name not in expected and name not in optional:
                raise ValueError(f"weights name a tensor {name!r} that the model does not have")
            if name in expected and tuple(expected[name]) != shape:
                raise ValueError(f"weights give {name!r} shape {shape}, the model has {tuple(expected[name])}")
        missing = sorted(set(expected) - set(self.names))
        if missing:
            raise ValueError(f"weights lack {len(missing)} tensor(s) of the model, e.g. {missing[0]!r}")
