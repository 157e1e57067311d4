"""Forgetting in an encoder: another task read through its own frozen head, before and after tuning.

Few-shot tuning on a target moves the whole encoder. What it costs elsewhere shows on a
task the model was not tuned on: a linear head is fitted once on the *pretrained*
encoder's sentence features of that task (:func:`fit_head`) and then frozen; after tuning
on the target, the same head reads the tuned encoder's features (:func:`head_accuracy`).
The drop from the pretrained model's figure is what tuning destroyed of the features
that task needs (the encoder counterpart of :mod:`.retention`'s in-context accuracy for
causal LMs; A-GEM-style projection onto a source gradient exists to keep it).

Features are the attention-masked mean of the encoder's last hidden state, the pooling
sentence encoders such as all-MiniLM-L6-v2 are trained with; any Hugging Face encoder
that returns ``hidden_states`` works. A head is fitted on a fixed, class-balanced subset
of the task's train pool (the same for every seed and row) and scored on a fixed,
class-balanced subset of its eval split (:func:`~.retention.query_indices`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from .retention import query_indices
from .sampling import eval_mode


@dataclass(frozen=True)
class FrozenHead:
    """A linear head on mean-pooled features, fitted on ``n_fit`` texts of ``task``; frozen."""

    task: str
    weight: Tensor  # [num_labels, hidden]
    bias: Tensor  # [num_labels]
    n_fit: int

    def predict(self, features: Tensor) -> Tensor:
        return (features.float() @ self.weight.T + self.bias).argmax(-1)


@torch.no_grad()
def sentence_features(model: nn.Module, tokenizer: Any, texts: Sequence[Any], *, max_length: int,
                      batch_size: int = 64) -> Tensor:
    """``[len(texts), hidden]``: the masked mean of the last hidden state, in eval mode.

    Texts are batched by length; each row does not depend on its batch-mates.
    """
    from ..fewshot.training import encoded  # the fewshot package imports methods lazily

    if not texts:
        raise ValueError("sentence_features needs at least one text")
    enc = encoded(tokenizer, texts, max_length)
    order = sorted(range(len(texts)), key=enc.lengths.__getitem__)
    rows: list[Optional[Tensor]] = [None] * len(texts)
    with eval_mode(model):
        for i in range(0, len(order), batch_size):
            idx = order[i: i + batch_size]
            batch = enc.batch(idx)
            out = model(**batch, output_hidden_states=True)
            hidden = getattr(out, "hidden_states", None)
            if not hidden:
                raise ValueError(f"{type(model).__name__} returns no hidden_states: the frozen-head measure "
                                 "needs an encoder that does (output_hidden_states=True)")
            mask = batch["attention_mask"].to(hidden[-1].dtype).unsqueeze(-1)
            pooled = (hidden[-1] * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            for j, row in zip(idx, pooled.float()):
                rows[j] = row
    return torch.stack(rows)  # type: ignore[arg-type]


def fit_logistic(features: Tensor, labels: Sequence[int], num_labels: int, *, l2: float = 1e-3,
                 max_iter: int = 200) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression, full batch (L-BFGS, deterministic): ``(weight, bias)``.

    Features are used as they are (no scaling), so the head reads the encoder's own geometry.

        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> w, b = fit_logistic(x, [0, 0, 1, 1], 2)
        >>> (x @ w.T + b).argmax(-1).tolist()
        [0, 0, 1, 1]
    """
    x = features.detach().double()
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} feature rows but {y.shape[0]} labels")
    w = torch.zeros(num_labels, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w.T + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().float(), b.detach().float()


def fit_head(model: nn.Module, tokenizer: Any, task: Any, *, max_length: int, n_fit: int = 1000) -> FrozenHead:
    """A :class:`FrozenHead` for ``task`` on ``model``'s current (pretrained) features,
    fitted on a fixed, class-balanced subset of ``n_fit`` of its train texts."""
    idx = query_indices(list(task.train_labels), n_fit)
    feats = sentence_features(model, tokenizer, [task.train_texts[i] for i in idx], max_length=max_length)
    w, b = fit_logistic(feats, [task.train_labels[i] for i in idx], task.num_labels)
    return FrozenHead(task.name, w, b, len(idx))


def head_accuracy(model: nn.Module, tokenizer: Any, task: Any, head: FrozenHead, *, max_length: int,
                  n_eval: Optional[int] = 500) -> float:
    """Accuracy of ``head`` on ``model``'s features of a fixed, class-balanced subset of
    ``n_eval`` eval texts of ``task``."""
    if head.task != task.name:
        raise ValueError(f"head was fitted on {head.task!r}, not {task.name!r}")
    idx = query_indices(list(task.eval_labels), n_eval)  # None: all of them
    feats = sentence_features(model, tokenizer, [task.eval_texts[i] for i in idx], max_length=max_length)
    truth = torch.tensor([task.eval_labels[i] for i in idx])
    return (head.predict(feats) == truth).float().mean().item()


_HEADS: dict[tuple, FrozenHead] = {}


def pretrained_heads(model: nn.Module, tokenizer: Any, tasks: Sequence[Any], *, max_length: int,
                     n_fit: int = 1000) -> list[FrozenHead]:
    """One head per task, fitted on ``model``'s features, which must be the pretrained
    model's (call before tuning); kept for the process, keyed by model folder, task,
    ``max_length`` and ``n_fit``, since every run of a grid starts from the same encoder."""
    folder = getattr(getattr(model, "config", None), "_name_or_path", None)
    out = []
    for t in tasks:
        key = (folder, t.name, max_length, n_fit)
        head = _HEADS.get(key) if folder else None
        if head is None:
            head = fit_head(model, tokenizer, t, max_length=max_length, n_fit=n_fit)
            if folder:
                _HEADS[key] = head
        out.append(head)
    return out
