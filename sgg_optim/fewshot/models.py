"""Model factories for the few-shot benchmark: ``task -> (fresh model, tokenizer)``.

SmolLM2-135M-Instruct classifies by label-word log-likelihood
(:class:`~sgg_optim.methods.incontext.VerbalizerLM`), the label words being the task's
``label_names``; its tokenizer is a :class:`~sgg_optim.methods.incontext.PromptTokenizer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn


from ..methods.incontext import PromptTokenizer, VerbalizerLM
from .training import ModelFactory



def load_tokenizer(folder: Path) -> Any:
    """``AutoTokenizer.from_pretrained(folder)``, or ``ValueError`` naming ``folder`` when it
    has no usable tokenizer.

    Without tokenizer files, transformers may still build a tokenizer of nothing but its
    special tokens, which reads every word as ``[UNK]``: training on that raises nothing
    and learns nothing. (A file list would refuse tokenizers saved under other names, or
    byte-level ones with no vocabulary file.)
    """
    from transformers import AutoTokenizer

    hint = "save the tokenizer beside the model: tokenizer.save_pretrained(folder)"
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: no usable tokenizer ({type(e).__name__}: {e}); {hint}") from None
    if len(tok) <= len(set(tok.all_special_ids)):
        raise ValueError(f"{folder}: the tokenizer has no vocabulary beyond its {len(tok)} special tokens (no "
                         f"tokenizer files?), so every word would read as unknown; {hint}")
    if tok.pad_token is None and tok.eos_token is None:  # batches are padded; eos is the usual stand-in
        raise ValueError(f"{folder}: the tokenizer has neither a pad token nor an eos token to pad batches with; "
                         "add one and save both: tokenizer.add_special_tokens({'pad_token': '[PAD]'}), "
                         "model.resize_token_embeddings(len(tokenizer))")
    positions = _position_limit(folder)
    if positions is not None and positions < tok.model_max_length:
        tok.model_max_length = positions  # texts are cut there (training.encode), not past the model's positions
    return tok


def _position_limit(folder: Path) -> Optional[int]:
    """How many tokens the model's position embeddings take, from its config (None: no limit
    given). RoBERTa-style models count positions from ``pad_token_id + 1``."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(folder))
    n = next((getattr(cfg, k) for k in ("max_position_embeddings", "n_positions", "max_seq_len")
              if isinstance(getattr(cfg, k, None), int)), None)
    if (n is None or getattr(cfg, "position_embedding_type", "absolute") != "absolute"
            or getattr(cfg, "position_biased_input", True) is False  # DeBERTa-v3: relative positions only
            or ("position_embedding_type" not in cfg.to_dict()  # an explicit "absolute" (ESM) wins
                and any(getattr(cfg, k, None) is not None for k in ("rope_theta", "rope_parameters", "rope_scaling")))):
        return None  # rotary or relative: no table of absolute positions to run past
    if cfg.model_type in ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "mpnet",
                          "data2vec-text", "roberta-prelayernorm", "ibert", "xmod", "luke", "markuplm",
                          "layoutlmv3", "esm") \
            and isinstance(getattr(cfg, "pad_token_id", None), int):
        n -= cfg.pad_token_id + 1
    return n if n > 0 else None


def check_label_words(words: Sequence[str], label_names: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``words`` has one distinct word per label.

        >>> check_label_words(["yes", "yes"], ["a", "b"])
        Traceback (most recent call last):
        ...
        ValueError: label words must differ: 'yes' scores two labels
    """
    if len(words) != len(label_names):
        raise ValueError(f"{len(words)} label words {list(words)} for {len(label_names)} labels "
                         f"{list(label_names)} (give one per label, in the labels' sorted order)")
    seen: set[str] = set()
    for w in words:
        if w in seen:
            raise ValueError(f"label words must differ: {w!r} scores two labels")
        seen.add(w)


class PairPromptTokenizer(PromptTokenizer):
    """A :class:`PromptTokenizer` that also takes ``(a, b)`` text pairs, joined by a newline
    into one text before the prompt is formatted (a causal LM reads the pair as one text)."""

    takes_pair_tuples = True

    def __call__(self, texts: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        texts = [texts] if isinstance(texts, (str, tuple)) else list(texts)
        texts = ["\n".join(t) if isinstance(t, tuple) else t for t in texts]
        return super().__call__(texts, *args, **kwargs)


def causal_lm_factory(folder: Optional[Path] = None, label_words: Optional[Sequence[str]] = None) -> ModelFactory:
    """A factory building a causal LM (fp32, fresh weights each call) as a verbalizer classifier.

    ``folder`` is a plain Hugging Face model folder (default: the cached SmolLM2 asset).
    Each class is scored by its label word: ``label_words`` in class order (the task's
    sorted label names, :mod:`.data`) or, by default, the task's ``label_names``.
    """
    hf_tok = load_tokenizer(folder) if folder is not None else None  # checked now, not mid-run

    def build(task: Any) -> tuple[VerbalizerLM, PromptTokenizer]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        label_names = getattr(task, "label_names", None)
        if not label_names:
            raise ValueError(f"task must be a Task with label_names (the label words), got {task!r}")
        words = tuple(label_words) if label_words else tuple(label_names)
        check_label_words(words, label_names)
        src = folder
        if src is None:
            from .assets import smollm2_folder  # written alongside; imported late so this module loads without it

            src = smollm2_folder()
        lm = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
        tok = PairPromptTokenizer(hf_tok if hf_tok is not None else AutoTokenizer.from_pretrained(str(src)), words)
        ids = tok.label_token_ids
        if len({tuple(c) for c in ids}) < len(ids):
            raise ValueError(f"label words {list(words)}: two of them are the same tokens for {src}'s tokenizer, "
                             "so their labels cannot be told apart; give --label-words that differ")
        return VerbalizerLM(lm, ids), tok

    return build


def smollm2_factory(folder: Optional[Path] = None) -> ModelFactory:
    """A factory building SmolLM2 (fp32, fresh weights each call) as a verbalizer classifier for a task.

    ``folder`` is a plain Hugging Face model folder; by default the cached asset
    (:func:`sgg_optim.fewshot.assets.smollm2_folder`).
    """
    return causal_lm_factory(folder)


def encoder_factory(folder: Path) -> ModelFactory:
    """Any encoder folder that ``AutoModelForSequenceClassification`` loads, with a fresh
    classification head of the task's size each call.

    A folder that already holds a classification head (of any size) gets it
    re-initialised: every weight outside the base model (``base_model_prefix``) is drawn
    fresh, as for a folder without one. A tokenizer without a pad token pads with eos.
    """
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(folder)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token

    def build(task: Any) -> tuple[nn.Module, Any]:
        # one label per text, cross-entropy: a folder's own problem_type (multi-label, regression) is not kept
        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder), num_labels=task.num_labels, ignore_mismatched_sizes=True,
            problem_type="single_label_classification")
        if model.config.pad_token_id is None and tok.pad_token_id is not None:
            model.config.pad_token_id = tok.pad_token_id
        prefix = getattr(model, "base_model_prefix", "")
        for name, module in model.named_modules():
            if name and prefix and not name.startswith(prefix) and not list(module.children()) \
                    and any(True for _ in module.parameters(recurse=False)):
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                model._init_weights(module)
        return model, tok

    return build


def model_kind(folder: Path) -> str:
    """``"causal"`` for a folder whose config names a causal-LM architecture
    (``*ForCausalLM`` / ``*LMHeadModel``), else ``"encoder"``."""
    import json

    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        inner = sorted(str(c.parent) for c in Path(folder).glob("*/config.json"))
        hint = f"; the model may be in {inner[0]}" if inner else ""  # an older sentence-transformers layout
        raise ValueError(f"{folder}: not a Hugging Face model folder (no config.json){hint}")
    archs = json.loads(cfg.read_text()).get("architectures") or []
    return "causal" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "encoder"
