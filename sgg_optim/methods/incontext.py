"""Causal LMs as classifiers by label-word log-likelihood, in-context-format fine-tuning and
the in-context retention measurement.

A causal LM classifies a text by scoring each label word after a prompt: logit ``c`` is
``log p(label_c tokens | prompt)`` summed over the label's tokens (exact, no first-token
shortcut). The same score serves three purposes:

- :class:`VerbalizerLM` wraps the LM as a sequence classifier (``.logits`` of shape
  ``[batch, num_labels]``, cross-entropy over label words), so the benchmark trains it like
  any classifier; :class:`PromptTokenizer` turns texts into prompts, optionally with
  demonstrations (in-context-format fine-tuning, :func:`prepare_icl_format`).
- :func:`label_loglik` is the no-grad batched scorer for arbitrary prompts and choices.
- :mod:`sgg_optim.methods.retention` measures with it how much in-context ability a
  fine-tuned model keeps.

Tokenization: a label word is tokenized on its own as a continuation (``" positive"``,
leading space, no special tokens) and its ids are appended to the prompt's ids. Tokenizing
``prompt + label`` jointly can merge tokens across the boundary, which would make the
scored tokens depend on the prompt. Prompts are right padded: real tokens keep positions
``0..len-1`` with no ``position_ids`` bookkeeping, which PEFT prompt tuning would ignore.
"""

from __future__ import annotations

import inspect
import random
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sampling import eval_mode

DEFAULT_TEMPLATE = "Text: {text}\nLabel:"
DEFAULT_LABEL_FORMAT = " {label}"
DEMO_SEPARATOR = "\n\n"


# ---------------------------------------------------------------- scoring core

def _device(lm: nn.Module) -> torch.device:
    return next(lm.parameters()).device


def _accepts_logits_to_keep(lm: nn.Module) -> bool:
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _logits_at(lm: nn.Module, seqs: Sequence[Sequence[int]], rows: Sequence[int], cols: Sequence[int]) -> Tensor:
    """Next-token logits of ``seqs[rows[i]]`` after its position ``cols[i]``: [len(rows), V], one forward.

    Sequences are right padded. The kept positions are counted from the end (negative
    indices), so the virtual tokens a PEFT prompt-tuning model prepends to ``.logits`` never
    shift them, and ``logits_to_keep`` runs the LM head on those positions only.
    """
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)  # pad id is irrelevant: masked, and after every real token
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    back = sorted({c - width for c in cols})
    column = {b: j for j, b in enumerate(back)}
    dev = _device(lm)
    keep = torch.tensor(back, device=dev)
    if _accepts_logits_to_keep(lm):
        logits = lm(input_ids=ids.to(dev), attention_mask=mask.to(dev), logits_to_keep=keep).logits
    else:
        logits = lm(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits[:, keep]
    return logits[torch.tensor(rows, device=dev), torch.tensor([column[c - width] for c in cols], device=dev)]


def choice_logliks(lm: nn.Module, prompt_ids: Sequence[Sequence[int]],
                   choice_ids: Sequence[Sequence[Sequence[int]]]) -> Tensor:
    """Differentiable ``[N, C]`` sums of ``log p(choice tokens | prompt)``, from token ids.

    ``choice_ids[n][c]`` is choice ``c`` of prompt ``n`` (every prompt has the same number
    of choices). When every choice is one token this is one forward over the prompts and a
    gather at each prompt's last position; otherwise each (prompt, choice) pair is one
    sequence (``N * C`` rows), all in one forward. The LM head only runs where a label
    token is scored.
    """
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids must hold at least one prompt, each of at least one token")
    n_choices = {len(row) for row in choice_ids}
    if len(choice_ids) != len(prompt_ids) or len(n_choices) != 1 or 0 in n_choices:
        raise ValueError("choice_ids must give the same, non-zero number of choices for every prompt")
    if any(len(c) == 0 for row in choice_ids for c in row):
        raise ValueError("choice_ids: every choice needs at least one token")
    ends = [len(p) - 1 for p in prompt_ids]  # position whose next-token distribution scores a choice's first token
    if all(len(c) == 1 for row in choice_ids for c in row):
        last = _logits_at(lm, prompt_ids, range(len(ends)), ends).float().log_softmax(-1)  # [N, V]
        idx = torch.tensor([[c[0] for c in row] for row in choice_ids], device=last.device)
        return last.gather(1, idx)
    seqs, rows, cols, toks = [], [], [], []  # one (row, position, token) per scored label token
    for p, end, row in zip(prompt_ids, ends, choice_ids):
        for c in row:
            rows += [len(seqs)] * len(c)
            cols += [end + t for t in range(len(c))]
            toks += list(c)
            seqs.append(list(p) + list(c))
    logp = _logits_at(lm, seqs, rows, cols).float().log_softmax(-1)  # [scored tokens, V]
    picked = logp.gather(1, torch.tensor(toks, device=logp.device)[:, None]).squeeze(1)
    sums = picked.new_zeros(len(seqs)).index_add(0, torch.tensor(rows, device=picked.device), picked)
    return sums.view(len(prompt_ids), -1)


def _can_share_prompt_cache(lm: nn.Module) -> bool:
    """An HF causal LM that takes a KV cache, and no PEFT prompt tuning (its virtual tokens
    would shift the cache positions)."""
    cfg = getattr(lm, "active_peft_config", None)
    if getattr(cfg, "is_prompt_learning", False):
        return False
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return "past_key_values" in inspect.signature(base.forward).parameters


def cached_choice_logliks(lm: nn.Module, prompt_ids: Sequence[Sequence[int]],
                          choice_ids: Sequence[Sequence[Sequence[int]]]) -> Tensor:
    """:func:`choice_logliks` for inference with multi-token choices: each prompt runs once and
    its KV cache is shared by all its choices (``C`` times fewer prompt tokens than one
    sequence per pair). Not for PEFT prompt-tuning models, whose virtual tokens the cache
    positions below do not account for.
    """
    dev = _device(lm)
    keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(lm) else {}
    out = []
    for p, row in zip(prompt_ids, choice_ids):
        res = lm(input_ids=torch.tensor([list(p)], device=dev), use_cache=True, **keep)
        first = res.logits[0, -1].float().log_softmax(-1)
        scores = [first[c[0]] for c in row]
        width = max(len(c) for c in row) - 1  # tokens after the first are fed with the prompt's cache
        if width > 0:
            cache = res.past_key_values
            cache.batch_repeat_interleave(len(row))
            ids = torch.zeros(len(row), width, dtype=torch.long)
            mask = torch.ones(len(row), len(p) + width, dtype=torch.long)
            for j, c in enumerate(row):
                ids[j, : len(c) - 1] = torch.as_tensor(list(c[:-1]))
                mask[j, len(p) + len(c) - 1:] = 0  # right padding after a shorter choice
            pos = (len(p) + torch.arange(width)).expand(len(row), -1)
            logp = lm(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                      past_key_values=cache, use_cache=False).logits.float().log_softmax(-1)
            scores = [scores[j] + sum((logp[j, t, c[t + 1]] for t in range(len(c) - 1)), logp.new_zeros(()))
                      for j, c in enumerate(row)]
        out.append(torch.stack(scores))
    return torch.stack(out)


def continuation_ids(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """Token ids of each word tokenized alone as a continuation (no special tokens)."""
    return [list(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words]


@torch.no_grad()
def label_loglik(lm: nn.Module, tokenizer: Any, prompts: Sequence[str],
                 choices: Sequence[Sequence[str]] | Sequence[str], *, batch_size: int = 16,
                 max_length: int = 1024) -> Tensor:
    """``[N, C]`` log-likelihood of each choice's tokens after each prompt (eval mode, no grad).

    ``choices`` is one list shared by all prompts (``[" no", " yes"]``) or one list per prompt;
    choices are continuations, so include the leading space. Prompts longer than
    ``max_length`` minus the longest choice lose tokens on the left, so the choice always fits.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shared = len(choices) > 0 and isinstance(choices[0], str)
    per_prompt = [list(choices)] * len(prompts) if shared else [list(c) for c in choices]
    if len(per_prompt) != len(prompts):
        raise ValueError(f"choices: {len(per_prompt)} lists for {len(prompts)} prompts")
    with eval_mode(lm):
        out = []
        for i in range(0, len(prompts), batch_size):
            cids = [continuation_ids(tokenizer, row) for row in per_prompt[i: i + batch_size]]
            pids = []
            for text, row in zip(prompts[i: i + batch_size], cids):
                budget = max_length - max(len(c) for c in row)
                if budget < 1:
                    raise ValueError(f"max_length={max_length} leaves no room for the prompt")
                pids.append(list(tokenizer(text)["input_ids"])[-budget:])
            single = all(len(c) == 1 for row in cids for c in row)
            score = cached_choice_logliks if not single and _can_share_prompt_cache(lm) else choice_logliks
            out.append(score(lm, pids, cids).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(per_prompt[0]) if per_prompt else 0)


# ---------------------------------------------------------------- prompts and demonstrations

def demonstration_indices(text: str, pool_texts: Sequence[str], pool_labels: Sequence[int], k: int, seed: int,
                          *, exclude_index: Optional[int] = None) -> list[int]:
    """Up to ``k`` pool indices for ``text``'s demonstrations, balanced over classes.

    Never the example itself: ``exclude_index`` (its pool index, when known) and every pool
    entry whose text equals ``text`` are left out, so duplicates cannot leak it either.
    Deterministic given ``seed`` and ``text``; fewer than ``k`` when the pool runs out.

        >>> sorted(demonstration_indices("b", ["a", "b", "c", "d", "b"], [0, 1, 0, 1, 1], k=2, seed=0))
        [0, 3]
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if len(pool_texts) != len(pool_labels):
        raise ValueError(f"pool_texts has {len(pool_texts)} entries but pool_labels {len(pool_labels)}")
    if k == 0:
        return []
    rng = random.Random(f"{seed}\x00{text}")  # str seeds hash with sha512: stable across processes
    by_class: dict[int, list[int]] = {}
    for i, (t, y) in enumerate(zip(pool_texts, pool_labels)):
        if i != exclude_index and t != text:
            by_class.setdefault(int(y), []).append(i)
    queues = [by_class[y] for y in sorted(by_class)]
    for q in queues:
        rng.shuffle(q)
    rng.shuffle(queues)
    picked: list[int] = []
    while len(picked) < k and any(queues):
        for q in queues:
            if q and len(picked) < k:
                picked.append(q.pop())
    rng.shuffle(picked)  # round-robin order would make the label sequence predictable
    return picked


def truncate_text(tokenizer: Any, text: str, max_tokens: Optional[int]) -> str:
    """``text`` cut after its first ``max_tokens`` tokens (character offsets, so no decode round trip)."""
    if max_tokens is None:
        return text
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text if len(offsets) <= max_tokens else text[: offsets[max_tokens - 1][1]]


class PromptTokenizer:
    """A tokenizer that turns texts into classification prompts for :class:`VerbalizerLM`.

    ``tok(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")`` cuts
    each *text* to ``max_length`` tokens, formats ``template`` (with demonstrations when set,
    each ``template + label_format`` and cut at ``demo_max_length`` tokens, default the call's
    ``max_length``), and returns right-padded ``input_ids`` / ``attention_mask``. The whole
    prompt is not truncated, so ``k`` demonstrations plus the query always fit.

    Demonstrations are drawn per text by :func:`demonstration_indices` from ``demo_texts``;
    at eval the same tokenizer still draws from those (the training shots).
    """

    def __init__(self, tokenizer: Any, label_names: Sequence[str], *, template: str = DEFAULT_TEMPLATE,
                 label_format: str = DEFAULT_LABEL_FORMAT, demo_texts: Sequence[str] = (),
                 demo_labels: Sequence[int] = (), k: int = 0, seed: int = 0,
                 demo_max_length: Optional[int] = None) -> None:
        if "{text}" not in template:
            raise ValueError(f"template must contain '{{text}}', got {template!r}")
        if "{label}" not in label_format:
            raise ValueError(f"label_format must contain '{{label}}', got {label_format!r}")
        if not label_names:
            raise ValueError("label_names is empty")
        if k > 0 and not demo_texts:
            raise ValueError(f"k={k} demonstrations requested but demo_texts is empty")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.label_names = tuple(label_names)
        self.template, self.label_format = template, label_format
        self.demo_texts, self.demo_labels = tuple(demo_texts), tuple(int(y) for y in demo_labels)
        self.k, self.seed, self.demo_max_length = k, seed, demo_max_length

    def with_demos(self, pool_texts: Sequence[str], pool_labels: Sequence[int], k: int, seed: int = 0,
                   demo_max_length: Optional[int] = None) -> "PromptTokenizer":
        """A copy that prepends up to ``k`` demonstrations drawn from the pool to every prompt."""
        return PromptTokenizer(self.tokenizer, self.label_names, template=self.template,
                               label_format=self.label_format, demo_texts=pool_texts, demo_labels=pool_labels,
                               k=k, seed=seed, demo_max_length=demo_max_length)

    @property
    def label_words(self) -> list[str]:
        """Each label as the continuation that is scored (``label_format`` applied)."""
        return [self.label_format.format(label=name) for name in self.label_names]

    @property
    def label_token_ids(self) -> list[list[int]]:
        """Each label word's continuation ids, as :class:`VerbalizerLM` wants them."""
        return continuation_ids(self.tokenizer, self.label_words)

    @property
    def pad_token_id(self) -> int:
        """The wrapped tokenizer's pad id (eos when it had none)."""
        return self.tokenizer.pad_token_id

    def prompts(self, texts: Sequence[str], max_length: Optional[int] = None) -> list[str]:
        """The prompt strings for ``texts`` (each text cut at ``max_length`` tokens)."""
        demo_cap = self.demo_max_length if self.demo_max_length is not None else max_length
        out = []
        for text in texts:
            parts = [self.template.format(text=truncate_text(self.tokenizer, self.demo_texts[i], demo_cap))
                     + self.label_format.format(label=self.label_names[self.demo_labels[i]])
                     for i in demonstration_indices(text, self.demo_texts, self.demo_labels, self.k, self.seed)]
            parts.append(self.template.format(text=truncate_text(self.tokenizer, text, max_length)))
            out.append(DEMO_SEPARATOR.join(parts))
        return out

    def __call__(self, texts: str | Sequence[str], truncation: bool = True, max_length: Optional[int] = None,
                 padding: bool | str = True, return_tensors: Optional[str] = "pt", **_: Any) -> dict[str, Any]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = [list(self.tokenizer(p)["input_ids"]) for p in self.prompts(texts, max_length if truncation else None)]
        if return_tensors is None:
            return {"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids]}
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        width = max(len(s) for s in ids)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, s in enumerate(ids):
            input_ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


def with_demonstrations(texts: Sequence[str], pool_texts: Sequence[str], pool_labels: Sequence[int],
                        label_names: Sequence[str], *, k: int, seed: int, template: str = DEFAULT_TEMPLATE,
                        label_format: str = DEFAULT_LABEL_FORMAT,
                        exclude_indices: Optional[Sequence[Optional[int]]] = None) -> list[str]:
    """Each text as a prompt preceded by up to ``k`` demonstrations from the pool (never itself).

        >>> with_demonstrations(["great"], ["bad", "fine"], [0, 1], ["neg", "pos"], k=1, seed=0)
        ['Text: fine\\nLabel: pos\\n\\nText: great\\nLabel:']
    """
    exclude = list(exclude_indices) if exclude_indices is not None else [None] * len(texts)
    if len(exclude) != len(texts):
        raise ValueError(f"exclude_indices has {len(exclude)} entries for {len(texts)} texts")
    out = []
    for text, ex in zip(texts, exclude):
        demos = [template.format(text=pool_texts[i]) + label_format.format(label=label_names[pool_labels[i]])
                 for i in demonstration_indices(text, pool_texts, pool_labels, k, seed, exclude_index=ex)]
        out.append(DEMO_SEPARATOR.join(demos + [template.format(text=text)]))
    return out


# ---------------------------------------------------------------- the classifier

class VerbalizerLM(nn.Module):
    """A causal LM as a sequence classifier: ``logits[b, c] = log p(label c's tokens | prompt b)``.

    Accepts left- or right-padded ``input_ids`` (real tokens are taken from ``attention_mask``
    and re-packed right-padded). ``.lm`` may be a PEFT model (LoRA, prompt or prefix tuning).
    """

    def __init__(self, lm: nn.Module, label_token_ids: Sequence[Sequence[int]]) -> None:
        super().__init__()
        if not label_token_ids or any(len(c) == 0 for c in label_token_ids):
            raise ValueError("label_token_ids needs one non-empty token list per label")
        self.lm = lm
        self.label_token_ids = [[int(t) for t in c] for c in label_token_ids]

    @property
    def num_labels(self) -> int:
        """How many label words are scored."""
        return len(self.label_token_ids)

    def score(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
              label_token_ids: Optional[Sequence[Sequence[int]]] = None) -> Tensor:
        """``[B, C]`` label log-likelihoods, for this model's labels or other ``label_token_ids``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
        return choice_logliks(self.lm, rows, [label_token_ids or self.label_token_ids] * len(rows))

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                **kwargs: Any) -> Any:
        """``SequenceClassifierOutput``: ``logits`` = :meth:`score`, ``loss`` = their cross-entropy
        with ``labels`` when given (other keywords, e.g. ``token_type_ids``, are ignored)."""
        from transformers.modeling_outputs import SequenceClassifierOutput

        unknown = [k for k, v in kwargs.items() if v is not None and k != "return_dict"]
        if unknown:
            raise ValueError(f"VerbalizerLM.forward got unsupported argument(s): {', '.join(unknown)}")
        logits = self.score(input_ids, attention_mask)
        loss = F.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def apply_lora_lm(model: VerbalizerLM, r: int = 8, target_modules: Optional[Sequence[str]] = None,
                  lora_alpha: Optional[int] = None) -> VerbalizerLM:
    """Wrap ``model.lm`` with PEFT LoRA adapters (causal-LM task type, the library's one
    LoRA setting: :func:`~sgg_optim.integrations.peft.lora_config`); only adapters train."""
    from peft import get_peft_model

    from ..integrations.peft import lora_config

    cfg = lora_config(model.lm, r, target_modules=target_modules, lora_alpha=lora_alpha, task_type="CAUSAL_LM")
    model.lm = get_peft_model(model.lm, cfg)
    return model


def prepare_icl_format(k: int = 4, demo_max_length: Optional[int] = None) -> Callable[[nn.Module, Any], tuple]:
    """Benchmark hook: same model, a tokenizer that prepends ``k`` demonstrations from the run's shots.

    During training an example never sees itself among its demonstrations; at eval the
    queries draw demonstrations from the same training shots (seeded by ``ctx.seed``).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")

    def prepare(model: nn.Module, ctx: Any) -> tuple[nn.Module, PromptTokenizer]:
        tok = ctx.tokenizer
        if not isinstance(tok, PromptTokenizer):
            tok = PromptTokenizer(tok, ctx.task.label_names)
        return model, tok.with_demos(ctx.train_texts, ctx.train_labels, k, seed=ctx.seed,
                                     demo_max_length=demo_max_length)

    return prepare
