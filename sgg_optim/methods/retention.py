"""In-context retention: how much of a causal LM's few-shot in-context ability survives tuning.

:func:`in_context_accuracy` classifies a task's eval texts with ``k`` demonstrations in the
prompt, scored by label-word log-likelihood (:func:`~sgg_optim.methods.incontext.label_loglik`);
:func:`retention_report` does it for several tasks; :func:`retention_lm` unwraps what the
benchmark trained (ProMoT's prompt removed, LoRA kept). :func:`icl_reference` turns the
pretrained model's in-context behaviour on a source task into a guidance reference.
"""

from __future__ import annotations

import random
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .incontext import DEFAULT_TEMPLATE, PromptTokenizer, VerbalizerLM, label_loglik
from .sampling import balanced_draw, eval_mode


def retention_lm(model: nn.Module) -> nn.Module:
    """The causal LM whose in-context ability to measure, from what the benchmark trained.

    A :class:`VerbalizerLM` gives its ``.lm``; a PEFT prompt-learning model gives its base
    model, i.e. the prompt removed at evaluation (ProMoT); a LoRA model keeps its adapters.
    A model without a language-model head (e.g. L-Tuning's classifier, which keeps only the
    backbone) raises ``ValueError``: L-Tuning changes no LM weight, so the LM it came from
    keeps exactly the pretrained model's in-context accuracy.
    """
    if isinstance(model, VerbalizerLM):
        return retention_lm(model.lm)
    cfg = getattr(model, "active_peft_config", None)
    if cfg is not None and getattr(cfg, "is_prompt_learning", False):
        return model.get_base_model()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no language-model head: in-context retention "
                         "needs a causal LM")
    return model


def icl_reference(model: VerbalizerLM, tokenizer: Any, source: Any, *, cfg: Any, seed: int = 0, k: int = 4,
                  num_batches: int = 8) -> Any:
    """Mean gradient of the label-word loss on ``k``-shot in-context prompts of ``source``, as a Reference.

    Captured at ``model``'s current (pretrained) point over its trainable parameters, on
    class-balanced batches of ``source.train_texts``, each with its own demonstrations from
    that pool and scored with ``source``'s label words: the direction that would improve
    in-context classification of the source task, which guidance can keep fine-tuning near.
    """
    from ..reference import capture_reference

    if not isinstance(model, VerbalizerLM):
        raise ValueError(f"model must be a VerbalizerLM, got {type(model).__name__}")
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    hf_tok = tokenizer.tokenizer if isinstance(tokenizer, PromptTokenizer) else tokenizer
    prompter = PromptTokenizer(hf_tok, source.label_names, demo_texts=source.train_texts,
                               demo_labels=source.train_labels, k=k, seed=seed)
    label_ids = prompter.label_token_ids
    rng = random.Random(f"icl-reference-{seed}")
    by_class = [[i for i, y in enumerate(source.train_labels) if y == c] for c in range(len(source.label_names))]
    per = max(1, cfg.batch_size // len(by_class))

    def batches():
        for _ in range(num_batches):
            idx = balanced_draw(by_class, per, rng)
            enc = prompter([source.train_texts[i] for i in idx], max_length=cfg.max_length)
            yield {**enc, "labels": torch.tensor([source.train_labels[i] for i in idx])}

    def loss_fn(m: VerbalizerLM, batch: dict) -> Tensor:
        logits = m.score(batch["input_ids"], batch["attention_mask"], label_ids)
        return F.cross_entropy(logits, batch["labels"].to(logits.device))

    with eval_mode(model):
        return capture_reference(model, batches(), loss_fn=loss_fn, num_batches=num_batches)


def query_indices(labels: Sequence[int], n_eval: Optional[int]) -> list[int]:
    """A fixed (seed-independent) subset of ``n_eval`` indices of ``labels``, balanced over classes
    where possible, in order; all when ``n_eval`` is None.

    Balanced because an eval set can be lopsided (rt-subjectivity's is about 94% one class),
    and there always guessing the majority label would pass for in-context ability.

        >>> labels = [0, 0, 0, 0, 0, 1, 1]
        >>> [labels[i] for i in query_indices(labels, 4)]
        [0, 0, 1, 1]
    """
    if n_eval is None or n_eval >= len(labels):
        return list(range(len(labels)))
    rng = random.Random(len(labels))
    queues = [[i for i, y in enumerate(labels) if y == c] for c in sorted(set(labels))]
    for q in queues:
        rng.shuffle(q)
    picked: list[int] = []
    while len(picked) < n_eval:
        for q in queues:
            if q and len(picked) < n_eval:
                picked.append(q.pop())
    return sorted(picked)


def in_context_accuracy(lm: nn.Module, tokenizer: Any, task: Any, *, k: int = 4, n_eval: Optional[int] = 200,
                        seed: int = 0, max_length: int = 64, batch_size: int = 8,
                        template: str = DEFAULT_TEMPLATE) -> float:
    """Accuracy of ``k``-shot in-context classification of ``task``'s eval texts by label-word scoring.

    Each query gets its own class-balanced demonstrations from ``task.train_texts`` (seeded by
    ``seed`` and the query), texts cut at ``max_length`` tokens; queries are a fixed,
    class-balanced subset of ``n_eval`` eval texts (:func:`query_indices`), the same for
    every seed and model.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    hf_tok = tokenizer.tokenizer if isinstance(tokenizer, PromptTokenizer) else tokenizer
    prompter = PromptTokenizer(hf_tok, task.label_names, template=template, demo_texts=task.train_texts,
                               demo_labels=task.train_labels, k=k, seed=seed)
    idx = query_indices(task.eval_labels, n_eval)
    if not idx:
        raise ValueError(f"task {task.name!r} has no eval texts")
    prompts = prompter.prompts([task.eval_texts[i] for i in idx], max_length)
    scores = label_loglik(retention_lm(lm), hf_tok, prompts, prompter.label_words, batch_size=batch_size,
                          max_length=1 << 30)  # demos and query are capped already: never cut the prompt
    hits = scores.argmax(-1) == torch.tensor([task.eval_labels[i] for i in idx])
    return hits.float().mean().item()


def retention_report(lm: nn.Module, tokenizer: Any, tasks: Sequence[Any], **kwargs: Any) -> dict[str, float]:
    """``{task.name: in_context_accuracy(...)}`` for the causal LM in ``lm`` (see :func:`retention_lm`)."""
    return {t.name: in_context_accuracy(lm, tokenizer, t, **kwargs) for t in tasks}
