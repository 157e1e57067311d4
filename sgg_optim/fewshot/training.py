"""One fine-tuning run: build the model, train for a fixed number of steps, evaluate.

Every strategy gets the same model, the same batches (same seed) and the same number of
steps; only the optimizer side differs. Per step the loop records the raw gradient norm,
the norm actually applied (after clipping or guidance), the cosine between consecutive
parameter updates and, for guided optimizers, ``opt.stats["cos"]`` (cosine to the
reference).
"""

from __future__ import annotations

import functools
import math
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..methods.sampling import balanced_draw, class_pools, eval_mode
from ..optimizer import GuidedOptimizer
from ..reference import Reference, capture_reference
from .strategies import Strategy

ModelFactory = Callable[[Any], tuple[nn.Module, Any]]  # task -> (model, tokenizer)


def minilm_factory(model_dir: Path) -> ModelFactory:
    """Build all-MiniLM-L6-v2 with a fresh classification head from a cached folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))

    def build(task: Any) -> tuple[nn.Module, Any]:
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=task.num_labels)
        return model, tok

    return build


def apply_lora(model: nn.Module, r: int = 8) -> nn.Module:
    """LoRA adapters on the attention projections (r=8, alpha 16).

    A classifier (``classifier`` head) keeps its fresh head trainable; a causal LM scored
    by label words (:class:`~sgg_optim.methods.incontext.VerbalizerLM`) gets the adapters
    on ``.lm`` (:func:`~sgg_optim.methods.incontext.apply_lora_lm`) and has no head to train.
    """
    from peft import get_peft_model

    from ..integrations.peft import lora_config
    from ..methods.incontext import VerbalizerLM, apply_lora_lm

    if isinstance(model, VerbalizerLM):
        return apply_lora_lm(model, r)
    # the fresh head's top modules train whole (PEFT's modules_to_save), whatever their names
    head = sorted({n.split(".")[0] for n in head_names(model)}) or ["classifier"]
    return get_peft_model(model, lora_config(model, r, modules_to_save=head, task_type="SEQ_CLS"))


@dataclass
class RunConfig:
    steps: int = 30
    batch_size: int = 16
    max_length: int = 64
    eval_batch_size: int = 64


def encode(tokenizer: Any, texts: Sequence[Any], max_length: int) -> dict[str, torch.Tensor]:
    """``texts`` tokenised and padded. Texts that are ``(a, b)`` pairs (a task with a text-pair
    column, :mod:`.data`) go in as ``tokenizer(a_list, b_list, ...)``, the tokenizer's pair
    encoding, unless the tokenizer sets ``takes_pair_tuples`` (it formats pairs itself)."""
    texts = list(texts)
    # never past the model's positions (models.load_tokenizer sets model_max_length from them)
    limit = getattr(tokenizer, "model_max_length", None)
    max_length = min(max_length, limit) if isinstance(limit, int) else max_length
    if texts and isinstance(texts[0], tuple) and not getattr(tokenizer, "takes_pair_tuples", False):
        return tokenizer([a for a, _ in texts], [b for _, b in texts], truncation=True, max_length=max_length,
                         padding=True, return_tensors="pt")
    return tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")


class Encoded:
    """``texts`` tokenised once; :meth:`batch` gives any subset as ``encode`` would.

    A right-padded encoding of the whole list, cut per batch to the batch's longest text,
    is the subset's own padded encoding (same ids, same masks), so a batch is a slice
    instead of a new tokenisation (BBC articles take ~2 ms each to tokenise). A tokenizer
    that pads on the left, or returns anything but ``(N, width)`` tensors, is called per
    batch instead.

        >>> enc = Encoded(lambda t, **k: {"input_ids": torch.tensor([[1, 2, 0], [3, 4, 5]]),
        ...                                "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])},
        ...               ["a b", "c d e"], max_length=8)
        >>> enc.lengths, enc.batch([0])["input_ids"].tolist()
        ([2, 3], [[1, 2]])
    """

    def __init__(self, tokenizer: Any, texts: Sequence[str], max_length: int) -> None:
        self.tokenizer, self.texts, self.max_length = tokenizer, list(texts), max_length
        enc = dict(encode(tokenizer, self.texts, max_length))
        mask = enc.get("attention_mask")
        n = len(self.texts)
        sliceable = isinstance(mask, torch.Tensor) and mask.dim() == 2 and all(
            isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == mask.shape for v in enc.values())
        if sliceable:
            lengths = mask.sum(1)
            sliceable = bool((mask == (torch.arange(mask.shape[1]) < lengths[:, None])).all())
        self.tensors = enc if sliceable else None
        self.lengths: list[int] = lengths.tolist() if sliceable else [len(t) for t in self.texts]
        assert len(self.lengths) == n

    def batch(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """The encoding of ``[texts[i] for i in idx]`` (padded to its longest)."""
        if self.tensors is None:
            return dict(encode(self.tokenizer, [self.texts[i] for i in idx], self.max_length))
        rows = torch.as_tensor(list(idx), dtype=torch.long)
        width = max(self.lengths[i] for i in idx)
        return {k: v[rows, :width].contiguous() for k, v in self.tensors.items()}


_ENCODED: "OrderedDict[tuple, Encoded]" = OrderedDict()
_ENCODED_MAX = 16


def encoded(tokenizer: Any, texts: Sequence[str], max_length: int) -> Encoded:
    """:class:`Encoded` ``texts``, kept for the next call with the same tokenizer and texts
    (the eval split is predicted once per cell; a grid has many cells per task)."""
    key = (id(tokenizer), max_length, tuple(texts))
    hit = _ENCODED.get(key)
    if hit is not None and hit.tokenizer is tokenizer:
        _ENCODED.move_to_end(key)
        return hit
    enc = Encoded(tokenizer, texts, max_length)
    _ENCODED[key] = enc  # holds the tokenizer: its id is not reused while the entry lives
    while len(_ENCODED) > _ENCODED_MAX:
        _ENCODED.popitem(last=False)
    return enc


def batches(tokenizer: Any, texts: Sequence[str], labels: Sequence[int], cfg: RunConfig, seed: int):
    """``cfg.steps`` shuffled batches (epochs reshuffled by ``seed``), as model keyword dicts."""
    rng = random.Random(seed)
    enc = Encoded(tokenizer, texts, cfg.max_length)  # the K shots, tokenised once
    order: list[int] = []
    for _ in range(cfg.steps):
        if len(order) < cfg.batch_size:
            fresh = list(range(len(texts)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        batch = enc.batch(idx)
        batch["labels"] = torch.tensor([labels[i] for i in idx])
        yield batch


@torch.inference_mode()
def predict(model: nn.Module, tokenizer: Any, texts: Sequence[str], cfg: RunConfig) -> list[int]:
    """The predicted class of every text, in order.

    Texts are batched by length (``cfg.eval_batch_size`` at a time, shortest first), so a
    batch pads to about its own length instead of its longest outlier; each text's
    prediction does not depend on its batch-mates (eval mode, masked padding).
    """
    model.eval()
    if not texts:
        return []
    enc = encoded(tokenizer, texts, cfg.max_length)
    order = sorted(range(len(texts)), key=enc.lengths.__getitem__)
    preds = [0] * len(texts)
    for i in range(0, len(order), cfg.eval_batch_size):
        idx = order[i: i + cfg.eval_batch_size]
        for j, p in zip(idx, model(**enc.batch(idx)).logits.argmax(-1).tolist()):
            preds[j] = p
    return preds


def balanced_batches(tokenizer: Any, texts: Sequence[str], labels: Sequence[int], cfg: RunConfig,
                     num_batches: int, seed: int = 0):
    """``num_batches`` batches of ``cfg.batch_size // C`` examples of every class, drawn by ``seed``.

    A reference is captured on these: with a fresh head, an unbalanced batch's gradient is
    dominated by moving the prior toward its majority class, whose sign follows the
    batch's class mix rather than the task (``benchmarks/reference_diagnostics.py``).
    """
    rng = random.Random(f"balanced-{seed}")
    by_class = class_pools(labels)
    per = max(1, cfg.batch_size // len(by_class))
    # a small pool (the K shots) is tokenised once; a large one (a source task) per batch
    enc = Encoded(tokenizer, texts, cfg.max_length) if len(texts) <= num_batches * cfg.batch_size else None
    for _ in range(num_batches):
        idx = balanced_draw(by_class, per, rng)
        batch = enc.batch(idx) if enc is not None else dict(encode(tokenizer, [texts[i] for i in idx], cfg.max_length))
        batch["labels"] = torch.tensor([labels[i] for i in idx])
        yield batch


def source_reference(model: nn.Module, tokenizer: Any, texts: Sequence[str], labels: Sequence[int],
                     cfg: RunConfig, num_batches: int = 8) -> Reference:
    """Mean source-task gradient at ``model``'s current point over class-balanced batches
    (dropout off while capturing)."""
    with eval_mode(model):
        return capture_reference(model, balanced_batches(tokenizer, texts, labels, cfg, num_batches),
                                 num_batches=num_batches)


class UpdateCosine:
    """Cosine between consecutive parameter updates, ``cos(Δt, Δt-1)``, over ``params`` as one vector.

    The same figure as flattening the parameters every step and differencing, on three
    preallocated flat buffers (no 90 MB allocation per step): copy the parameters in,
    subtract the previous copy, one dot product; the previous update's norm is kept.

        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> uc = UpdateCosine([w])
        >>> _ = w.data.add_(torch.tensor([1.0, 0.0])); uc.step()
        nan
        >>> _ = w.data.add_(torch.tensor([1.0, 1.0])); round(uc.step(), 4)
        0.7071
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = [p.detach() for p in params]
        n = sum(p.numel() for p in self.params)
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in self.params), self.params[0].dtype)
        self.prev, self.now, self.delta, self.prev_delta = (
            torch.empty(n, dtype=dtype, device=self.params[0].device) for _ in range(4))
        self.prev_norm: Optional[torch.Tensor] = None
        self._flatten(self.prev)

    def _flatten(self, out: torch.Tensor) -> None:
        torch.cat([p.reshape(-1) for p in self.params], out=out)

    def step(self) -> float:
        """Record the parameters now; the cosine of this update with the previous (NaN at first)."""
        self._flatten(self.now)
        torch.sub(self.now, self.prev, out=self.delta)
        norm = self.delta.norm()
        cos = math.nan
        if self.prev_norm is not None:
            denom = float(norm * self.prev_norm)
            cos = float(self.delta @ self.prev_delta) / denom if denom > 0 else math.nan
        self.prev, self.now = self.now, self.prev
        self.delta, self.prev_delta = self.prev_delta, self.delta
        self.prev_norm = norm
        return cos


HEAD_NAMES = ("classifier", "score")  # BERT-style and Llama-style sequence-classification heads


def head_names(model: nn.Module) -> frozenset[str]:
    """Names of the parameters of the fresh classification head: every parameter outside
    the pretrained body (``base_model_prefix``: what :func:`.models.encoder_factory` draws
    fresh, DistilBERT's ``pre_classifier`` and BART's ``classification_head`` included), or,
    for a model that names no body, those under a module named in :data:`HEAD_NAMES`."""
    names = [n for n, _ in model.named_parameters()]
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else None
    if isinstance(base, nn.Module) and base is not model:  # a PEFT model: the base model's head, at its path
        at = next((n for n, m in model.named_modules() if m is base), None)  # (LoRA: base_model.model)
        if at:
            return frozenset(f"{at}.{n}" for n in head_names(base))
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and any(n.startswith(prefix + ".") for n in names):
        return frozenset(n for n in names if not n.startswith(prefix + "."))
    return frozenset(n for n in names if any(part in HEAD_NAMES for part in n.split(".")))


def without_head(reference: Any, model: nn.Module) -> Any:
    """``reference`` (one :class:`Reference` or a list) with the head's entries zero, bound
    to ``model``: a block whose reference is zero is left unguided."""
    if isinstance(reference, (list, tuple)):
        return [without_head(r, model) for r in reference]
    head = head_names(model)
    return Reference({n: torch.zeros_like(reference[n]) if n in head else reference[n] for n in reference.names},
                     storage=reference.storage).bind(model)


def fit(model: nn.Module, opt: torch.optim.Optimizer, data: Iterable[dict[str, Any]],
        loss_fn: Optional[Callable[[nn.Module, dict[str, Any]], Tensor]] = None, *,
        before_step: Optional[Callable[[int], None]] = None,
        after_step: Optional[Callable[[int, Tensor], None]] = None) -> list[float]:
    """The one training loop (the benchmark's rows and ProMoT's stages): per batch, the loss
    (``model(**batch).loss`` or ``loss_fn(model, batch)``), ``zero_grad``, ``backward``,
    ``before_step(step)`` with the gradients in (a probe's masks, clipping, measurements),
    ``opt.step()``, then ``after_step(step, loss)``. Returns the losses.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> data = [{"x": torch.ones(4, 2)}] * 3
        >>> losses = fit(model, opt, data, lambda m, b: m(b["x"]).square().mean())
        >>> len(losses), losses[-1] < losses[0]
        (3, True)
    """
    model.train()
    losses = []
    for step, batch in enumerate(data):
        loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step(step)
        opt.step()
        losses.append(float(loss.detach()))
        if after_step is not None:
            after_step(step, loss)
    return losses


def train(model: nn.Module, strategy: Strategy, lr: float, data: Any, cfg: RunConfig,
          reference: Optional[Reference | Sequence[Reference]] = None,
          on_step: Optional[Callable[[int], None]] = None) -> dict[str, list]:
    """Train ``model`` in place on ``data`` (an iterable of batches); the per-step trace.

    The loss is ``model(**batch).loss``, or the strategy's ``objective`` (which sees the
    reference too). With several source references the trace also holds each step's
    alignment weights (``weights``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    probe = round(strategy.probe_fraction * cfg.steps)
    head = head_names(model) if probe else frozenset()
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and n not in head] if probe else []
    if probe and len(frozen) == len(params):
        raise ValueError(f"strategy {strategy.name}: a linear probe needs a classification head (parameters "
                         f"outside the model's base_model_prefix, or named {' or '.join(HEAD_NAMES)}); "
                         "this model has none")
    opt = strategy.build_optimizer(model, lr, reference)
    single = reference if isinstance(reference, Reference) else None
    loss_fn = strategy.objective(model, single) if strategy.objective is not None else None
    trace: dict[str, list] = {k: [] for k in ("loss", "grad_norm", "applied_norm", "update_cos", "ref_cos")}
    update_cos = UpdateCosine(params)
    raw = applied = math.nan

    def before_step(step: int) -> None:
        nonlocal raw, applied
        if step < probe:  # linear probe: the encoder gets no gradient, so no update at all
            for p in frozen:
                p.grad = None
        raw = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        applied = raw
        if strategy.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, strategy.clip_norm)
            applied = min(raw, strategy.clip_norm)

    def after_step(step: int, loss: Tensor) -> None:
        nonlocal applied
        ref_cos = math.nan
        if isinstance(opt, GuidedOptimizer):
            s = opt.stats
            applied = float(s.get("guided_norm", raw))
            ref_cos = float(s.get("cos", math.nan))
            if isinstance(s.get("weights"), (list, tuple)):
                trace.setdefault("weights", []).append([float(w) for w in s["weights"]])
        figures = getattr(loss_fn, "stats", None)  # an objective's own figures (SGG's exact loss)
        if isinstance(figures, dict):
            loss = torch.as_tensor(figures.get("loss", float(loss.detach())))  # the task loss, without penalties
            if math.isnan(ref_cos):
                ref_cos = float(figures.get("cos", math.nan))
        upd_cos = update_cos.step()
        for k, v in (("loss", float(loss.detach())), ("grad_norm", raw), ("applied_norm", applied),
                     ("update_cos", upd_cos), ("ref_cos", ref_cos)):
            trace[k].append(v)
        if on_step is not None:
            on_step(step)

    fit(model, opt, data, loss_fn, before_step=before_step, after_step=after_step)
    return trace
