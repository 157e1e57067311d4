"""Reference directions: capture them from a source task, save, load, hand to an optimizer.

A :class:`Reference` maps parameter names to stored tensors (fp32, bf16 or int8) and,
when it came from a model, remembers which parameter each name belongs to, so an
optimizer can find its reference by parameter identity.
"""

from __future__ import annotations

import itertools
import json
import operator
import os
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import REFERENCE_DTYPES
from .sharding import ShardSpec, gather, is_sharded, local_slice
from .storage import INT8, Store, make_store, store_from_state
from .version import __version__

PathLike = Union[str, "os.PathLike[str]"]
_FORMAT_NAME = "sgg-optim-reference"
_STATE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}


def _layers(model: nn.Module) -> list[nn.Module]:
    """``model`` and each module it wraps, outermost first: DDP's ``module`` and
    ``torch.compile``'s ``_orig_mod``, however nested."""
    layers = [model]
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return layers
        layers.append(model)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose parameter names users see: strips DDP's ``module.`` and
    ``torch.compile``'s ``_orig_mod.`` prefixes, however nested."""
    return _layers(model)[-1]


def _sum_over_ranks(sums: dict[str, Tensor], count: int, model: nn.Module, accelerator: Any) -> int:
    """Under Accelerate data parallelism, a model that is not DDP-wrapped (such as
    ``accelerator.unwrap_model(model)``) leaves each rank with the gradients of its own
    batches only, and every rank would guide toward another reference: sum them over the
    ranks in place and return the number of batches of all ranks (else ``count``, as it
    is). DDP's backward and FSDP2's reduce-scatter already averaged them."""
    if (accelerator is None or getattr(accelerator, "num_processes", 1) <= 1
            or not (torch.distributed.is_available() and torch.distributed.is_initialized())
            or any(isinstance(m, nn.parallel.DistributedDataParallel) for m in _layers(model))
            or any(is_sharded(t) for t in sums.values())):
        return count
    for t in sums.values():  # the same order on every rank: named_parameters'
        torch.distributed.all_reduce(t)
    total = torch.tensor([float(count)], device=next(iter(sums.values())).device)
    torch.distributed.all_reduce(total)
    return int(total.item())


# what :func:`_unwrap` strips from parameter names: torch.compile's and DDP's wrappers
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def local_device(t: Tensor) -> torch.device:
    """The device of ``t``'s data on this rank (its local shard's, for a DTensor)."""
    return t.to_local().device if is_sharded(t) else t.device


def param_names(optimizer: torch.optim.Optimizer) -> dict[Tensor, str]:
    """Parameter -> name, for optimizers built from ``model.named_parameters()``."""
    names: dict[Tensor, str] = {}
    for group in optimizer.param_groups:
        for p, n in zip(group["params"], group.get("param_names", ())):
            names[p] = n
    return names


class Reference:
    """A reference direction: one stored tensor per parameter name.

    Build one with :func:`capture_reference` or :meth:`load`, or from tensors directly.
    Under FSDP2 each rank keeps only its shard of each sharded tensor (DTensor);
    :meth:`save` gathers them into one ordinary file and :meth:`load` cuts each rank's
    shard again, so a file does not depend on how the model was sharded.

    Example:
        >>> import torch
        >>> ref = Reference({"weight": torch.ones(2, 3)}, storage="bf16")
        >>> ref.names, ref.storage, ref["weight"].dtype
        (['weight'], 'bf16', torch.float32)
    """

    def __init__(self, tensors: Mapping[str, Tensor], *, storage: str = "fp32",
                 model: Optional[nn.Module] = None) -> None:
        if storage not in REFERENCE_DTYPES:
            raise ValueError(f"storage must be one of {REFERENCE_DTYPES}, got {storage!r}")
        self.storage = storage
        # name -> where the shards live, for the tensors that are sharded (FSDP2)
        self.specs: dict[str, ShardSpec] = {n: ShardSpec.of(t) for n, t in tensors.items() if is_sharded(t)}
        self.stores: dict[str, Store] = {
            n: make_store(t.to_local() if n in self.specs else t, storage) for n, t in tensors.items()}
        self._bound: dict[Tensor, str] = {}
        if model is not None:
            self.bind(model)

    @classmethod
    def _from_stores(cls, stores: dict[str, Store], storage: str) -> "Reference":
        ref = cls({}, storage=storage)
        ref.stores = stores
        return ref

    @property
    def names(self) -> list[str]:
        """Parameter names, in insertion order."""
        return list(self.stores)

    def __getitem__(self, name: str) -> Tensor:
        """The reference for ``name``, dequantised to fp32 (this rank's shard if sharded)."""
        return self.stores[name].dense()

    def shape(self, name: str) -> torch.Size:
        """The full shape of ``name``'s tensor (also when this rank holds a shard)."""
        return self.specs[name].shape if name in self.specs else self.stores[name].shape

    def __contains__(self, name: object) -> bool:
        return name in self.stores

    def __len__(self) -> int:
        return len(self.stores)

    def __repr__(self) -> str:
        return f"Reference({len(self)} tensors, storage={self.storage!r})"

    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return sum(s.nbytes() for s in self.stores.values())

    def bind(self, model: nn.Module) -> "Reference":
        """Remember which of ``model``'s parameters each name belongs to; returns self."""
        self._bound = {p: n for n, p in _unwrap(model).named_parameters()}
        return self

    @property
    def bound_names(self) -> dict[Tensor, str]:
        """Parameter -> name for the model this reference is bound to (empty if unbound)."""
        return dict(self._bound)

    def _key(self, param: Tensor, name: Optional[str]) -> Optional[str]:
        if param in self._bound:  # the model's own name (binding already unwrapped it)
            key = self._bound[param]
            return key if key in self.stores else None
        # a name from the optimizer (model.named_parameters()); a compiled or DDP model's
        # carries '_orig_mod.' / 'module.': drop one at a time, first match wins
        while name is not None and name not in self.stores:
            name = name.split(".", 1)[1] if name.startswith(_WRAPPER_PREFIXES) else None
        return name

    def check_covers(self, param: Tensor, name: Optional[str], description: str, source: int = 0) -> None:
        """Raise ``ValueError`` unless this reference has ``param``'s tensor with its shape."""
        key = self._key(param, name)
        if key is None:
            hint = ""
            if self._bound and param not in self._bound:
                hint = (" (the reference was captured on, or bound to, a model without this parameter: if "
                        "an adapter added it since (PEFT's get_peft_model, a trainer's peft_config), capture "
                        "the reference on the model as it is trained, e.g. trainer.model after the trainer "
                        "is built; if the trained model is another instance, ref.bind(that_model))")
            elif not (self._bound or name):
                hint = (" (the reference is not bound to a model: use Reference.load(path, model), "
                        "capture_reference(model, ...), ref.bind(model), or build the optimizer "
                        "from model.named_parameters())")
            raise ValueError(f"reference {source} has no tensor for parameter {description}{hint}")
        shape = self.shape(key)
        if shape != param.shape:
            raise ValueError(f"reference {source} tensor '{key}' has shape {tuple(shape)}, "
                             f"parameter {description} has {tuple(param.shape)}")

    def store_for(self, param: Tensor, name: Optional[str], storage: str) -> Store:
        """The stored reference of ``param`` as ``storage``, on ``param``'s device."""
        key = self._key(param, name)
        store = self.stores[key]  # type: ignore[index]
        if is_sharded(param) and key not in self.specs:  # a full reference for a sharded parameter
            return make_store(local_slice(store.dense().to(param.device), ShardSpec.of(param)), storage)
        same_device = next(iter(store.state().values())).device == local_device(param)
        if storage == self.storage and same_device:
            return store  # frozen: safe to share, no copy
        return make_store(store.dense().to(local_device(param)), storage)

    # -- files ---------------------------------------------------------------------------
    def save(self, path: PathLike) -> None:
        """Write safetensors with metadata (names, shapes, dtype, storage, version).

        Atomic: written to a temporary file beside ``path``, then renamed over it. A
        sharded reference is gathered first, which is a collective: every rank calls
        ``save``, rank 0 writes, and all ranks return once the file is in place.
        """
        path = Path(path)
        tensors: dict[str, Tensor] = {}
        for name, store in self.stores.items():
            if name in self.specs:
                store = make_store(gather(store.dense(), self.specs[name]), self.storage)
            for part, t in store.state().items():
                tensors[f"{name}/{part}"] = t.detach().cpu().contiguous()
        if self.specs and torch.distributed.get_rank() != 0:
            torch.distributed.barrier()
            return
        metadata = {
            "format": _FORMAT_NAME,
            "library_version": __version__,
            "storage": self.storage,
            "dtype": _STATE_DTYPES[self.storage],
            "blocksize": str(INT8.blocksize),  # of the int8 code references are written in
            "names": json.dumps(self.names),
            "shapes": json.dumps({n: list(self.shape(n)) for n in self.stores}),
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            if self.specs:
                torch.distributed.barrier()

    @classmethod
    def load(cls, path: PathLike, model: nn.Module, *, device: Optional[torch.device] = None) -> "Reference":
        """Read a reference written by :meth:`save` and bind it to ``model``.

        Checks that the file names exactly the model's trainable parameters with their
        shapes; the first mismatch raises ``ValueError`` naming it and the file. For a
        sharded (FSDP2) parameter each rank keeps its own shard.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _FORMAT_NAME:
                    raise ValueError(f"{str(path)!r} is not an sgg-optim reference (metadata format "
                                     f"{meta.get('format')!r})")
                storage, names, shapes = _parse_metadata(meta, str(path))
                parts = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read reference file {str(path)!r}: {e}") from e
        params = {n: p for n, p in _unwrap(model).named_parameters()}
        trainable = [n for n, p in params.items() if p.requires_grad]
        for n in names:
            if n not in params:
                raise ValueError(f"reference file {str(path)!r} has tensor '{n}' that the model lacks")
            if shapes[n] != params[n].shape:
                raise ValueError(f"reference file {str(path)!r} tensor '{n}' has shape {tuple(shapes[n])}, "
                                 f"the model's parameter has {tuple(params[n].shape)}")
        missing = [n for n in trainable if n not in shapes]
        if missing:
            raise ValueError(f"reference file {str(path)!r} has no tensor for trainable parameter '{missing[0]}'")
        stores: dict[str, Store] = {}
        specs: dict[str, ShardSpec] = {}
        for n in names:
            # A fresh (aligned) copy: results then match the in-memory reference bit for
            # bit, and nothing keeps the file mapped.
            state = {k.rsplit("/", 1)[1]: v.to(device or local_device(params[n]), copy=True)
                     for k, v in parts.items() if k.rsplit("/", 1)[0] == n}
            try:
                if not state:
                    raise ValueError("no tensors stored")
                stores[n] = store_from_state(state, shapes[n], storage)
            except ValueError as e:
                raise ValueError(f"reference file {str(path)!r} tensor '{n}': {e}") from e
            if is_sharded(params[n]):
                specs[n] = ShardSpec.of(params[n])
                stores[n] = make_store(local_slice(stores[n].dense(), specs[n]), storage)
        ref = cls._from_stores(stores, storage)
        ref.specs = specs
        return ref.bind(model)


def _parse_metadata(meta: Mapping[str, str], path: str) -> tuple[str, list[str], dict[str, torch.Size]]:
    """(storage, names, shapes) of a reference file's metadata, each checked; a
    ``ValueError`` names the file and the field."""
    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"reference file {path!r}: metadata {field!r} {why}")

    storage = meta.get("storage")
    if storage not in REFERENCE_DTYPES:
        raise bad("storage", f"is {storage!r}, expected one of {REFERENCE_DTYPES} (written by sgg-optim "
                             f"{meta.get('library_version', '?')}; this is {__version__})")
    try:
        names, shapes = json.loads(meta.get("names", "")), json.loads(meta.get("shapes", ""))
    except json.JSONDecodeError as e:
        raise bad("names/shapes", f"is not JSON: {e}") from e
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad("names", "must be a list of parameter names")
    if not isinstance(shapes, dict):
        raise bad("shapes", "must map each name to its shape")
    for n in names:
        shape = shapes.get(n)
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise bad("shapes", f"has no valid shape for {n!r} (got {shape!r})")
    return storage, names, {n: torch.Size(shapes[n]) for n in names}


def _call_model(model: nn.Module, batch: Any) -> Tensor:
    if isinstance(batch, (tuple, list)):
        try:
            out = model(*batch)
        except TypeError as e:  # most often (inputs, targets): the model cannot take the targets
            raise TypeError(f"{e} (capture_reference called model(*batch) on a {type(batch).__name__} batch "
                            "because loss_fn is None; for (inputs, targets) batches pass "
                            "loss_fn=lambda model, batch: ...)") from e
    else:
        out = model(**batch) if isinstance(batch, Mapping) else model(batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise ValueError("the model's output has no .loss: pass loss_fn=lambda model, batch: ...")
    return loss


def capture_reference(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: Optional[Callable[[nn.Module, Any], Tensor]] = None,
    num_batches: Optional[int] = None,
    accelerator: Any = None,
    reference_dtype: str = "fp32",
) -> Reference:
    """The mean gradient of a source task over ``batches``, as a :class:`Reference`.

    Each batch's loss is ``loss_fn(model, batch)``, or the model's own ``.loss`` when
    ``loss_fn`` is None (dict batches are passed as keyword arguments). Only parameters
    that require grad are captured. The model runs in the mode it is in (the gradient
    is the one training sees, dropout included), but parameters and buffers are never
    changed (BatchNorm's running statistics are put back) and every ``.grad`` is put
    back as it was. With an Accelerate ``accelerator``, the forward runs under
    its autocast, names come from the unwrapped model, and under data parallelism
    every rank gets the mean over all ranks' batches, whether ``model`` is the prepared
    (DDP) model or ``accelerator.unwrap_model(model)``. Without one, capture through the
    DDP model, whose backward averages the ranks' gradients.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> batches = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
        >>> ref = capture_reference(model, batches, loss_fn=lambda m, x: m(x).sum())
        >>> ref["weight"].tolist()
        [[0.5, 0.5]]
    """
    if reference_dtype not in REFERENCE_DTYPES:
        raise ValueError(f"reference_dtype must be one of {REFERENCE_DTYPES}, got {reference_dtype!r}")
    if num_batches is not None:
        try:  # ints, numpy and tensor integers; not floats or bools
            if isinstance(num_batches, bool):
                raise TypeError
            num_batches = operator.index(num_batches)
        except TypeError:
            raise TypeError(f"num_batches must be an int, got {type(num_batches).__name__} {num_batches!r}") from None
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    # one batch where an iterable of them was meant (a Tensor would be read row by row); iter()
    # also takes a map-style dataset, which iterates through __getitem__
    try:
        # (inputs, targets) of different ranks is one batch (a split tensor's parts share their rank)
        if isinstance(batches, (Mapping, Tensor, str, bytes)) or (
                isinstance(batches, tuple) and len(batches) == 2 and all(isinstance(b, Tensor) for b in batches)
                and batches[0].dim() != batches[1].dim()):
            raise TypeError
        iter(batches)
    except TypeError:
        raise TypeError(f"batches must be an iterable of batches (a list, a DataLoader, a generator), got "
                        f"a single {type(batches).__name__}: wrap one batch in a list, [batch]") from None
    named = [(n, p) for n, p in _unwrap(model).named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameter that requires grad")
    saved = [p.grad for _, p in named]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    autocast = accelerator.autocast if accelerator is not None else None
    count = 0
    try:
        for p in (p for _, p in named):
            p.grad = None
        # islice: stop before pulling batch num_batches + 1 from a shared iterator
        for batch in itertools.islice(batches, num_batches):
            with torch.enable_grad(), (autocast() if autocast is not None else nullcontext()):
                loss = loss_fn(model, batch) if loss_fn is not None else _call_model(model, batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else \
                    f"a {type(loss).__name__}"
                raise ValueError(f"the loss of batch #{count} is {what}, not a one-element tensor: "
                                 f"{'loss_fn' if loss_fn is not None else 'the model'} must return the batch's "
                                 "loss reduced to a scalar (e.g. .mean())")
            loss.backward()
            count += 1
        sums = {n: (p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
                for n, p in named}
        # after the collectives: a rank without a batch must still join them
        count = _sum_over_ranks(sums, count, model, accelerator)
        if count == 0:
            raise ValueError("batches yielded no batch")
        tensors = {n: s / count for n, s in sums.items()}
    finally:
        for (_, p), g in zip(named, saved):
            p.grad = g
        with torch.no_grad():
            for b, before in buffers:
                b.copy_(before)
    return Reference(tensors, storage=reference_dtype, model=model)
