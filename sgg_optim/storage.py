"""How one reference tensor is stored: fp32, bf16, or int8 blockwise.

int8 is a linear grid with one absmax scale per block (:class:`LinearInt8Store`,
plain torch ops). States saved with bitsandbytes' dynamic code book
(:class:`Int8Store`, the int8 code before the linear grid was measured faster at the
same error: ``benchmarks/results/int8_store.md``) still load, and need bitsandbytes.

Each store exposes the three operations the guidance passes need: a dot product
with a gradient, ``g += b * r``, and the EMA update ``r += w (g - r)``. Low-precision
stores work chunk by chunk, so no full fp32 copy of a reference is ever made.
"""

from __future__ import annotations

import threading
import weakref
from typing import Iterator, NamedTuple, Optional, Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]

_CHUNK = 1 << 20  # elements per chunk for low-precision stores (4 MiB of fp32 scratch)
INT8_BLOCKSIZE = 4096
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _bnb_functional():  # type: ignore[no-untyped-def]
    try:
        import bitsandbytes.functional as F
    except ImportError as e:  # pragma: no cover - exercised only without bitsandbytes
        raise ImportError(
            "this int8 reference was saved with bitsandbytes' dynamic code book, which needs "
            "bitsandbytes to read: pip install 'sgg-optim[bnb]' (new int8 references use a "
            "linear grid and do not need it)"
        ) from e
    return F


class _Scratch(threading.local):
    """This thread's fp32 scratch chunks for :func:`_fp32`, by (device, slot): per thread,
    so that two optimizers stepping in two threads never write into one buffer."""

    def __init__(self) -> None:
        self.bufs: dict[tuple[torch.device, int], Tensor] = {}


_scratch = _Scratch()


def _fp32(x: Tensor, slot: int) -> Tensor:
    """``x`` as fp32: itself if it is, else a copy in a reused per-device scratch chunk.

    Reusing the buffer keeps low-precision passes from allocating 4 MiB per chunk
    (measured: the allocations alone could triple a bf16 statistics pass). A result
    is valid until this thread's next call with the same ``slot``.
    """
    if x.dtype == torch.float32:
        return x
    key, bufs = (x.device, slot), _scratch.bufs
    buf = bufs.get(key)
    if buf is None or buf.numel() < x.numel():
        buf = bufs[key] = torch.empty(max(_CHUNK, x.numel()), dtype=torch.float32, device=x.device)
    return buf[: x.numel()].copy_(x)


def _spans(numel: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, step):
        yield start, min(start + step, numel)


class DenseStore:
    """A reference kept as a plain fp32 or bf16 tensor of the parameter's shape, always
    contiguous (row-major), whatever the parameter's memory format: the passes index it
    flat, and a gradient in another layout is matched element by element by shape."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor.contiguous()
        # The flat view, made once: making it per call costs as much as a small tensor's dot.
        self.flat = self.tensor.view(-1)

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    def dot(self, g: Tensor) -> Tensor:
        g, r = g.reshape(-1), self.flat
        if g.dtype == torch.float32 and r.dtype == torch.float32:
            return torch.dot(g, r)
        if r.numel() == 0:
            return torch.zeros((), device=r.device)
        # One fp32 chunk pair at a time (each dot is done before the scratch is reused).
        return torch.stack([torch.dot(_fp32(g[s:e], 0), _fp32(r[s:e], 1))
                            for s, e in _spans(r.numel(), _CHUNK)]).sum()

    def sqnorm(self) -> Tensor:
        r = self.flat
        return torch.dot(r, r) if r.dtype == torch.float32 else self.dot(r)

    def add_to_(self, g: Tensor, b: Scalar) -> None:
        """``g += b * r`` in g's dtype."""
        r = self.tensor.view_as(g)
        g.add_(r, alpha=b) if isinstance(b, float) else g.addcmul_(r, b)

    def lerp_(self, g: Tensor, w: float) -> None:
        """``r += w (g - r)``: the EMA update toward the final gradient."""
        r = self.tensor
        if r.dtype == g.dtype:
            r.lerp_(g.view_as(r), w)
            return
        flat, gf = self.flat, g.reshape(-1)
        for s, e in _spans(flat.numel(), _CHUNK):
            flat[s:e].copy_(_fp32(flat[s:e], 0).lerp_(_fp32(gf[s:e], 1), w))

    def dense(self) -> Tensor:
        return self.tensor.float()

    def state(self) -> dict[str, Tensor]:
        return {"values": self.tensor}

    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


# The last dequantised single-chunk int8 reference. The guidance step reads each
# reference twice in a row (``dot`` then ``sqnorm`` in the statistics pass, ``add_to_``
# then ``lerp_`` in the apply pass); keeping one chunk (at most _CHUNK floats, whatever
# the model size) saves half the dequantisations. Valid while the store's tensors are
# the same objects at the same version (in-place writes bump it).
_last_chunk: Optional[tuple[Tensor, Tensor, tuple[int, int], Tensor]] = None
_maps: dict[torch.device, Tensor] = {}


def _dynamic_map(device: torch.device) -> Tensor:
    """bitsandbytes' signed dynamic 8-bit code (256 values), one copy per device."""
    if device not in _maps:
        _maps[device] = _bnb_functional().create_dynamic_map(signed=True).to(device)
    return _maps[device]


class Int8Store:
    """A reference quantised blockwise with bitsandbytes' dynamic 8-bit code (absmax per
    block of 4096): the int8 code of earlier versions, kept so that their saved states
    and reference files load (needs bitsandbytes). New int8 references are
    :class:`LinearInt8Store`.

    Costs 1 byte per element plus 4 bytes per block (about 1.001 B/param).
    """

    def __init__(self, codes: Tensor, absmax: Tensor, shape: torch.Size) -> None:
        _bnb_functional()  # without bitsandbytes, fail here (at load) rather than at a later step
        self.codes, self.absmax, self._shape = codes, absmax, torch.Size(shape)
        self._code = _dynamic_map(codes.device)

    @classmethod
    def quantize(cls, x: Tensor) -> "Int8Store":
        F = _bnb_functional()
        flat = x.detach().reshape(-1)
        codes = torch.empty(flat.numel(), dtype=torch.uint8, device=x.device)
        absmax = torch.empty(-(-flat.numel() // INT8_BLOCKSIZE), dtype=torch.float32, device=x.device)
        store = cls(codes, absmax, x.shape)
        for (s, e), blocks in store._chunks():
            F.quantize_blockwise(flat[s:e].float(), code=store._code, absmax=absmax[blocks],
                                 out=codes[s:e], blocksize=INT8_BLOCKSIZE)
        return store

    @classmethod
    def zeros(cls, shape: torch.Size, device: torch.device) -> "Int8Store":
        """What :meth:`quantize` gives for zeros, without making an fp32 zero tensor."""
        block = cls.quantize(torch.zeros(min(INT8_BLOCKSIZE, max(shape.numel(), 1)), device=device))
        numel = shape.numel()
        codes = torch.full((numel,), int(block.codes[0]) if numel else 0, dtype=torch.uint8, device=device)
        absmax = torch.zeros(-(-numel // INT8_BLOCKSIZE), dtype=torch.float32, device=device)
        return cls(codes, absmax, shape)

    @property
    def shape(self) -> torch.Size:
        return self._shape

    def _chunks(self) -> Iterator[tuple[tuple[int, int], slice]]:
        for s, e in _spans(self.codes.numel(), _CHUNK):  # _CHUNK is a multiple of the blocksize
            yield (s, e), slice(s // INT8_BLOCKSIZE, -(-e // INT8_BLOCKSIZE))

    def _dequant(self, span: tuple[int, int], blocks: slice) -> Tensor:
        global _last_chunk
        s, e = span
        single = e - s == self.codes.numel()
        if single and _last_chunk is not None:
            codes, absmax, versions, values = _last_chunk
            if codes is self.codes and absmax is self.absmax and versions == (codes._version, absmax._version):
                return values
        values = _bnb_functional().dequantize_blockwise(
            self.codes[s:e], absmax=self.absmax[blocks], code=self._code, blocksize=INT8_BLOCKSIZE)
        if single:
            _last_chunk = (self.codes, self.absmax, (self.codes._version, self.absmax._version), values)
        return values

    def _values(self) -> Iterator[Tensor]:
        """The reference, dequantised one fp32 chunk at a time."""
        for span, blocks in self._chunks():
            yield self._dequant(span, blocks)

    def _gchunks(self, g: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """Aligned chunks of (g, dequantised r)."""
        gf = g.reshape(-1)
        for ((s, e), _), rc in zip(self._chunks(), self._values()):
            yield gf[s:e], rc

    def dot(self, g: Tensor) -> Tensor:
        return sum((torch.dot(gc.float(), rc) for gc, rc in self._gchunks(g)),
                   torch.zeros((), device=g.device))

    def sqnorm(self) -> Tensor:
        return sum((torch.dot(rc, rc) for rc in self._values()),
                   torch.zeros((), device=self.codes.device))

    def add_to_(self, g: Tensor, b: Scalar) -> None:
        if not g.is_contiguous():  # e.g. channels_last: no flat view to write through
            r = self.dense().view(g.shape)
            g.add_(r, alpha=b) if isinstance(b, float) else g.addcmul_(r, b)
            return
        for gc, rc in self._gchunks(g.view(-1)):
            gc.add_(rc, alpha=b) if isinstance(b, float) else gc.addcmul_(rc, b)

    def lerp_(self, g: Tensor, w: float) -> None:
        F, gf = _bnb_functional(), g.reshape(-1)
        for (s, e), blocks in self._chunks():
            new = self._dequant((s, e), blocks).lerp_(gf[s:e].float(), w)
            F.quantize_blockwise(new, code=self._code, absmax=self.absmax[blocks],
                                 out=self.codes[s:e], blocksize=INT8_BLOCKSIZE)

    def dense(self) -> Tensor:
        return torch.cat([self.codes.new_empty(0, dtype=torch.float32), *self._values()]).view(self._shape)

    def state(self) -> dict[str, Tensor]:
        return {"codes": self.codes, "absmax": self.absmax}

    def nbytes(self) -> int:
        return self.codes.numel() + self.absmax.numel() * 4


LINEAR_BLOCKSIZE = 1024


class _Int8Scratch(threading.local):
    """This thread's fp32 scratch for :class:`LinearInt8Store`, and which chunk of which
    store its first row holds dequantised.

    Reused rather than allocated per call: a fresh fp32 chunk per call made the int8 passes
    up to 4x slower (``benchmarks/results/int8_store.md``). Per thread, so that steps running
    in two threads do not share it; two rows of _CHUNK floats (8 MiB) per thread and device.
    On CUDA, reuse is ordered by the stream: passes of one thread must share one stream
    (as an optimizer step's do).
    """

    def __init__(self) -> None:
        self.bufs: dict[torch.device, Tensor] = {}
        # (store, chunk, codes version, scale version) dequantised in row 0: the guidance
        # step reads a reference twice in a row (``dot`` then ``sqnorm``, ``add_to_`` then
        # ``lerp_``), so the second read costs nothing.
        self.holds: Optional[tuple[weakref.ref, int, int, int]] = None

    def buf(self, device: torch.device) -> Tensor:
        b = self.bufs.get(device)
        if b is None:
            b = self.bufs[device] = torch.zeros(2, _CHUNK, dtype=torch.float32, device=device)
        return b


_int8_scratch = _Int8Scratch()


class _Views(NamedTuple):
    """One chunk's views of a thread's scratch (made once per store, chunk and thread)."""

    buf: Tensor  # the whole scratch, to tell whose views these are
    values: Tensor  # row 0, the chunk's length: its fp32 values
    blocks: Tensor  # row 0 padded to whole blocks, as [blocks, blocksize]
    pad: Tensor  # the padding of a short last block (often empty)
    spare: Tensor  # row 1, the chunk's length: a gradient converted to fp32
    spare_blocks: Tensor  # row 1 as [blocks, blocksize]


class LinearInt8Store:
    """A reference quantised blockwise to signed int8 on a linear grid:
    ``r ~ codes * scale[block]``, ``scale = absmax / 127`` per block of
    :data:`LINEAR_BLOCKSIZE` elements.

    Plain torch ops (no code-book lookup), so they vectorise and compile. Costs 1 byte
    per element plus 4 per block (about 1.004 bytes per parameter). Works chunk by chunk
    (chunks are whole blocks) in a per-thread fp32 scratch, never holding a full fp32 copy
    nor allocating one per call.

    Example:
        >>> s = LinearInt8Store.quantize(torch.tensor([0.5, -1.0, 0.25]))
        >>> s.codes.tolist(), round(s.sqnorm().item(), 4)
        ([64, -127, 32], 1.3174)
    """

    blocksize = LINEAR_BLOCKSIZE

    def __init__(self, codes: Tensor, scale: Tensor, shape: torch.Size) -> None:
        self.codes, self.scale, self._shape = codes, scale, torch.Size(shape)
        bs = self.blocksize
        # Per chunk: (start, end), its codes, its blocks' scales as a column. Made once, as
        # are the scratch views below: a slice or view costs ~1 us, as much as a small
        # tensor's whole dot.
        self._chunks = [((s, e), codes[s:e], scale[s // bs: -(-e // bs)].view(-1, 1))
                        for s, e in _spans(codes.numel(), _CHUNK)]  # _CHUNK is a multiple of bs
        self._views: list[Optional[_Views]] = [None] * len(self._chunks)

    def __getstate__(self) -> dict[str, object]:
        # The tensors only: pickle would copy a chunk view apart from its base, and the
        # scratch views belong to a thread (and would add its 8 MiB).
        return {"codes": self.codes, "scale": self.scale, "shape": self._shape}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["codes"], state["scale"], state["shape"])  # type: ignore[misc, arg-type]

    @classmethod
    def quantize(cls, x: Tensor) -> "LinearInt8Store":
        flat = x.detach().reshape(-1)
        n = flat.numel()
        store = cls(torch.empty(n, dtype=torch.int8, device=x.device),
                    torch.empty(-(-n // cls.blocksize), dtype=torch.float32, device=x.device), x.shape)
        for i, ((s, e), _, _) in enumerate(store._chunks):
            _int8_scratch.holds = None
            store._scratch(i).values.copy_(flat[s:e])
            store._encode(i)
        return store

    @classmethod
    def zeros(cls, shape: torch.Size, device: torch.device) -> "LinearInt8Store":
        n = shape.numel()
        return cls(torch.zeros(n, dtype=torch.int8, device=device),
                   torch.zeros(-(-n // cls.blocksize), dtype=torch.float32, device=device), shape)

    @property
    def shape(self) -> torch.Size:
        return self._shape

    def _scratch(self, i: int) -> _Views:
        """Chunk ``i``'s views of this thread's scratch."""
        buf = _int8_scratch.buf(self.codes.device)
        v = self._views[i]
        if v is None or v.buf is not buf:
            (s, e), _, scale = self._chunks[i]
            n, m, bs = e - s, scale.numel() * self.blocksize, self.blocksize
            v = self._views[i] = _Views(buf, buf[0, :n], buf[0, :m].view(-1, bs), buf[0, n:m],
                                        buf[1, :n], buf[1, :m].view(-1, bs))
        return v

    def _encode(self, i: int) -> None:
        """Quantise chunk ``i`` from the fp32 values in the scratch (which it overwrites)."""
        _, codes, scale = self._chunks[i]
        v = self._scratch(i)
        if v.pad.numel():
            v.pad.zero_()  # a short last block: zeros leave its absmax alone
        torch.div(torch.abs(v.blocks, out=v.spare_blocks).amax(dim=1, keepdim=True), 127.0, out=scale)
        # 1/scale, 0 where the block is 0 or not finite (and where 1/scale overflows)
        inv = torch.reciprocal(scale).nan_to_num_(0.0, 0.0, 0.0)
        v.blocks.mul_(inv).round_()
        codes.copy_(v.values)

    def _dequant(self, i: int) -> Tensor:
        """Chunk ``i`` in fp32, in the scratch: valid until this thread's next
        LinearInt8Store call on this device."""
        sc = _int8_scratch
        _, codes, scale = self._chunks[i]
        v = self._scratch(i)
        key = (i, self.codes._version, self.scale._version)
        if sc.holds is None or sc.holds[0]() is not self or sc.holds[1:] != key:
            sc.holds = None  # until the chunk is in
            v.values.copy_(codes)
            # codes, then scale in place: torch.mul(int8, fp32, out=) makes an fp32 copy first.
            v.blocks.mul_(scale)
            sc.holds = (weakref.ref(self), *key)
        return v.values

    def _as_fp32(self, i: int, g: Tensor) -> Tensor:
        """A gradient chunk as fp32: itself, or a copy in the spare scratch row."""
        return g if g.dtype == torch.float32 else self._scratch(i).spare.copy_(g)

    def _sum(self, parts: list[Tensor]) -> Tensor:
        return sum(parts[1:], parts[0]) if parts else torch.zeros((), device=self.codes.device)

    def dot(self, g: Tensor) -> Tensor:
        gf = g.reshape(-1)
        return self._sum([torch.dot(self._as_fp32(i, gf[s:e]), self._dequant(i))
                          for i, ((s, e), _, _) in enumerate(self._chunks)])

    def sqnorm(self) -> Tensor:
        return self._sum([torch.dot(r, r) for r in map(self._dequant, range(len(self._chunks)))])

    def add_to_(self, g: Tensor, b: Scalar) -> None:
        if not g.is_contiguous():  # e.g. channels_last: no flat view to write through
            r = self.dense().view(g.shape)
            g.add_(r, alpha=b) if isinstance(b, float) else g.addcmul_(r, b)
            return
        gf = g.view(-1)
        for i, ((s, e), _, _) in enumerate(self._chunks):
            r = self._dequant(i)
            gf[s:e].add_(r, alpha=b) if isinstance(b, float) else gf[s:e].addcmul_(r, b)

    def lerp_(self, g: Tensor, w: float) -> None:
        gf = g.reshape(-1)
        for i, ((s, e), _, _) in enumerate(self._chunks):
            r = self._dequant(i)
            _int8_scratch.holds = None  # from here on the scratch no longer matches the codes
            r.lerp_(self._as_fp32(i, gf[s:e]), w)
            self._encode(i)

    def dense(self) -> Tensor:
        out = torch.empty(self._shape.numel(), dtype=torch.float32, device=self.codes.device)
        for i, ((s, e), _, _) in enumerate(self._chunks):
            out[s:e].copy_(self._dequant(i))
        return out.view(self._shape)

    def state(self) -> dict[str, Tensor]:
        return {"codes": self.codes, "scale": self.scale}

    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 4


Store = Union[DenseStore, Int8Store, LinearInt8Store]
Int8Kind = Union[type[Int8Store], type[LinearInt8Store]]
# The two int8 codes: bitsandbytes' dynamic code book and a linear grid. New int8
# references use INT8; a saved state names its kind by its tensors ("absmax": dynamic,
# "scale": linear) and loads as that kind. The linear grid won on measurement
# (benchmarks/results/int8_store.md: the same cosine error, faster, no bitsandbytes).
INT8_CODES: dict[str, Int8Kind] = {"dynamic": Int8Store, "linear": LinearInt8Store}
INT8: Int8Kind = LinearInt8Store


def make_store(x: Tensor, storage: str) -> Store:
    """Store a copy of ``x`` as ``storage`` (``"fp32"``, ``"bf16"`` or ``"int8"``).

    Example:
        >>> s = make_store(torch.tensor([3.0, 4.0]), "bf16")
        >>> s.tensor.dtype, s.sqnorm().item()
        (torch.bfloat16, 25.0)
    """
    if storage == "int8":
        return INT8.quantize(x)
    return DenseStore(x.detach().to(_DTYPES[storage], memory_format=torch.contiguous_format, copy=True))


def zeros_store(like: Tensor, storage: str) -> Store:
    """A zero reference shaped like ``like``, e.g. the start of an EMA reference."""
    if storage == "int8":
        return INT8.zeros(like.shape, like.device)
    return DenseStore(torch.zeros(like.shape, device=like.device, dtype=_DTYPES[storage]))


class ShapeMismatch(ValueError):
    """A saved reference holds another number of elements (or another shape) than the
    parameter it is loaded for: another model, or another rank's shard."""


def store_from_state(state: dict[str, Tensor], shape: torch.Size, storage: str) -> Store:
    """Rebuild a store from :meth:`state`, checking it matches ``shape`` and ``storage``
    (:class:`ShapeMismatch` where only the size or shape differs)."""
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise ValueError("expected a dict of tensors")
    if storage == "int8" and set(state) == {"codes", "scale"}:
        codes, scale = state["codes"], state["scale"]
        blocks = -(-shape.numel() // LinearInt8Store.blocksize)
        if codes.dtype == torch.int8 and codes.dim() == 1 and codes.numel() != shape.numel():
            raise ShapeMismatch(f"int8 reference has {codes.numel()} codes, expected {shape.numel()}")
        if codes.dtype != torch.int8 or codes.dim() != 1:
            raise ValueError(f"int8 reference has codes {codes.dtype} of shape {tuple(codes.shape)}, "
                             f"expected torch.int8 of shape ({shape.numel()},)")
        if scale.dtype != torch.float32 or tuple(scale.shape) != (blocks,):
            raise ValueError(f"int8 reference has scale {scale.dtype} of shape {tuple(scale.shape)}, "
                             f"expected float32 of shape ({blocks},)")
        return LinearInt8Store(codes, scale, shape)
    if storage == "int8":
        if set(state) != {"codes", "absmax"} or state["codes"].dtype != torch.uint8:
            raise ValueError(f"expected int8 reference state (codes, scale) or (codes, absmax), got {sorted(state)}")
        codes, absmax = state["codes"], state["absmax"]
        if codes.dim() != 1:
            raise ValueError(f"int8 reference has codes of shape {tuple(codes.shape)}, expected ({shape.numel()},)")
        if codes.numel() != shape.numel():
            raise ShapeMismatch(f"int8 reference has {codes.numel()} codes, expected {shape.numel()}")
        blocks = -(-shape.numel() // INT8_BLOCKSIZE)
        if absmax.dtype != torch.float32 or tuple(absmax.shape) != (blocks,):
            raise ValueError(f"int8 reference has absmax {absmax.dtype} of shape {tuple(absmax.shape)}, "
                             f"expected float32 of shape ({blocks},)")
        return Int8Store(codes, absmax, shape)
    values = state.get("values")
    if set(state) != {"values"} or values is None or values.dtype != _DTYPES[storage]:
        raise ValueError(f"expected {storage} reference values, got {({k: v.dtype for k, v in state.items()})}")
    if values.shape != shape:
        raise ShapeMismatch(f"reference has shape {tuple(values.shape)}, expected {tuple(shape)}")
    return DenseStore(values)
