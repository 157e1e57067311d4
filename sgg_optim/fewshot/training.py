"""One fine-tuning run: build the model, train for a fixed number of steps, evaluate.

Every strategy gets the same model, the same batches (same seed) and the same number of
steps; only the optimizer side differs. Per step the loop records the raw gradient norm,
the norm actually applied (after clipping or guidance), the cosine between consecutive
parameter updates and, for guided optimizers, ``opt.stats["cos"]`` (cosine to the
reference).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

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
    from peft import LoraConfig, get_peft_model

    from ..methods.incontext import VerbalizerLM, apply_lora_lm

    if isinstance(model, VerbalizerLM):
        return apply_lora_lm(model, r)
    targets = [n for n in ("query", "value", "q_proj", "v_proj")
               if any(name.endswith(n) for name, _ in model.named_modules())]
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets,
                     modules_to_save=["classifier"], task_type="SEQ_CLS")
    return get_peft_model(model, cfg)


@dataclass
class RunConfig:
    steps: int = 30
    batch_size: int = 16
    max_length: int = 64
    eval_batch_size: int = 64


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")


def batches(tokenizer: Any, texts: Sequence[str], labels: Sequence[int], cfg: RunConfig, seed: int):
    """``cfg.steps`` shuffled batches (epochs reshuffled by ``seed``), as model keyword dicts."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(cfg.steps):
        if len(order) < cfg.batch_size:
            fresh = list(range(len(texts)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        enc = encode(tokenizer, [texts[i] for i in idx], cfg.max_length)
        enc["labels"] = torch.tensor([labels[i] for i in idx])
        yield dict(enc)


@torch.no_grad()
def predict(model: nn.Module, tokenizer: Any, texts: Sequence[str], cfg: RunConfig) -> list[int]:
    model.eval()
    preds: list[int] = []
    for i in range(0, len(texts), cfg.eval_batch_size):
        enc = encode(tokenizer, texts[i: i + cfg.eval_batch_size], cfg.max_length)
        preds += model(**enc).logits.argmax(-1).tolist()
    return preds


def balanced_batches(tokenizer: Any, texts: Sequence[str], labels: Sequence[int], cfg: RunConfig,
                     num_batches: int, seed: int = 0):
    """``num_batches`` batches of ``cfg.batch_size // C`` examples of every class, drawn by ``seed``.

    A reference is captured on these: with a fresh head, an unbalanced batch's gradient is
    dominated by moving the prior toward its majority class, whose sign follows the
    batch's class mix rather than the task (``benchmarks/reference_diagnostics.py``).
    """
    rng = random.Random(f"balanced-{seed}")
    by_class = {c: [i for i, y in enumerate(labels) if y == c] for c in sorted(set(labels))}
    per = max(1, cfg.batch_size // len(by_class))
    for _ in range(num_batches):
        idx = [i for pool in by_class.values() for i in rng.sample(pool, min(per, len(pool)))]
        enc = encode(tokenizer, [texts[i] for i in idx], cfg.max_length)
        enc["labels"] = torch.tensor([labels[i] for i in idx])
        yield dict(enc)


def source_reference(model: nn.Module, tokenizer: Any, texts: Sequence[str], labels: Sequence[int],
                     cfg: RunConfig, num_batches: int = 8) -> Reference:
    """Mean source-task gradient at ``model``'s current point over class-balanced batches
    (dropout off while capturing)."""
    model.eval()
    src = balanced_batches(tokenizer, texts, labels, cfg, num_batches)
    ref = capture_reference(model, src, num_batches=num_batches)
    model.train()
    return ref


def _flat_trainable(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def train(model: nn.Module, strategy: Strategy, lr: float, data: Any, cfg: RunConfig,
          reference: Optional[Reference | Sequence[Reference]] = None,
          on_step: Optional[Callable[[int], None]] = None) -> dict[str, list]:
    """Train ``model`` in place on ``data`` (an iterable of batches); the per-step trace.

    The loss is ``model(**batch).loss``, or the strategy's ``objective`` (which sees the
    reference too). With several source references the trace also holds each step's
    alignment weights (``weights``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = strategy.build_optimizer(model, lr, reference)
    single = reference if isinstance(reference, Reference) else None
    loss_fn = strategy.objective(model, single) if strategy.objective is not None else None
    trace: dict[str, list] = {k: [] for k in ("loss", "grad_norm", "applied_norm", "update_cos", "ref_cos")}
    model.train()
    prev = _flat_trainable(params)
    prev_delta: Optional[torch.Tensor] = None
    for step, batch in enumerate(data):
        loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        raw = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        applied = raw
        if strategy.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, strategy.clip_norm)
            applied = min(raw, strategy.clip_norm)
        opt.step()
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
        now = _flat_trainable(params)
        delta = now - prev
        upd_cos = math.nan
        if prev_delta is not None:
            denom = float(delta.norm() * prev_delta.norm())
            upd_cos = float(delta @ prev_delta) / denom if denom > 0 else math.nan
        prev, prev_delta = now, delta
        for k, v in (("loss", float(loss.detach())), ("grad_norm", raw), ("applied_norm", applied),
                     ("update_cos", upd_cos), ("ref_cos", ref_cos)):
            trace[k].append(v)
        if on_step is not None:
            on_step(step)
    return trace
