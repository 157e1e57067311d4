"""L-Tuning: label-derived soft prompt or prefix and a label-embedding classifier.

Kowsher et al., "L-TUNING: Synchronized Label Tuning for Prompt and Prefix in LLMs" (2023).
Each class's label text (``"negative"``, ``"business"``) goes through the **frozen**
pretrained model once; that gives

- the initial label embeddings: the pooled encoding of each label text, a trainable ``[C, H]``
  matrix, and
- the initial soft prompt (regime ``"prompt"``: the label tokens' input embeddings, PEFT
  prompt tuning) or prefix (regime ``"prefix"``: the label text's own per-layer keys and
  values, PEFT prefix tuning).

The input's representation (mean-pooled for encoders, last real token for decoders) is compared
to each label embedding by scaled cosine. Only the label embeddings, the prompt / prefix and,
if asked, the scale train; every pretrained weight stays frozen.

The math is small pure functions (pooling, cosine logits, the K/V-to-prefix layout);
:class:`LabelTuningClassifier` is the thin stateful shell; :func:`prepare_ltuning` is the
few-shot benchmark's ``prepare`` hook.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sampling import eval_mode

REGIMES = ("prompt", "prefix")
POOLINGS = ("mean", "last")
DEFAULT_SCALE = 20.0  # cosine x 1/0.05, the usual contrastive temperature


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Average of ``hidden [B, T, H]`` over the positions where ``mask [B, T]`` is 1.

    >>> mean_pool(torch.tensor([[[1.0], [3.0], [9.0]]]), torch.tensor([[1, 1, 0]]))
    tensor([[2.]])
    """
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def last_token_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Hidden state at the last position where ``mask`` is 1, for left or right padding alike.

    >>> h = torch.arange(4.0).view(1, 4, 1)
    >>> last_token_pool(h, torch.tensor([[1, 1, 0, 0]])), last_token_pool(h, torch.tensor([[0, 1, 1, 1]]))
    (tensor([[1.]]), tensor([[3.]]))
    """
    positions = torch.arange(mask.shape[1], device=mask.device)
    # the largest index holding a 1; argmax of a 0/1 mask would find the first one instead
    last = (positions * mask.long()).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def pool(hidden: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """``mean_pool`` or ``last_token_pool`` by name."""
    if pooling == "mean":
        return mean_pool(hidden, mask)
    if pooling == "last":
        return last_token_pool(hidden, mask)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def cosine_logits(reps: Tensor, label_embeddings: Tensor, scale: Tensor | float) -> Tensor:
    """``scale * cos(reps[b], label_embeddings[c])`` as ``[B, C]`` logits.

    >>> cosine_logits(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]]), 20.0)
    tensor([[20.,  0.]])
    """
    return scale * F.normalize(reps, dim=-1) @ F.normalize(label_embeddings, dim=-1).T


def tile_ids(ids: Sequence[int], n: int) -> list[int]:
    """``ids`` repeated and cut to length ``n`` (how PEFT's TEXT init fits text to the prompt length).

    >>> tile_ids([7, 8, 9], 5), tile_ids([7, 8, 9], 2)
    ([7, 8, 9, 7, 8], [7, 8])
    """
    if not ids:
        raise ValueError("ids must not be empty")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return (list(ids) * math.ceil(n / len(ids)))[:n]


def kv_to_prefix(keys: Sequence[Tensor], values: Sequence[Tensor]) -> Tensor:
    """Per-layer ``[heads, T, head_dim]`` keys and values in PEFT's prefix-encoder layout.

    PEFT's ``get_prompt`` views the ``[T, L * 2 * heads * head_dim]`` embedding as
    ``[T, L * 2, heads, head_dim]`` with the key of layer ``l`` at ``2l`` and its value at ``2l + 1``.

    >>> k, v = [torch.zeros(1, 2, 3)], [torch.ones(1, 2, 3)]
    >>> kv_to_prefix(k, v).tolist()
    [[0.0, 0.0, 0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]]
    """
    if len(keys) != len(values) or not keys:
        raise ValueError(f"keys and values must be non-empty and of equal length, got {len(keys)}, {len(values)}")
    kv = torch.stack([torch.stack([k, v]) for k, v in zip(keys, values)])  # [L, 2, heads, T, hd]
    return kv.permute(3, 0, 1, 2, 4).reshape(kv.shape[3], -1)


def default_pooling(backbone: nn.Module) -> str:
    """``"mean"`` for masked-LM (bidirectional encoder) families such as BERT, else ``"last"``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = getattr(getattr(backbone, "config", None), "model_type", "")
    return "mean" if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "last"


def label_token_ids(tokenizer: Any, label_names: Sequence[str]) -> list[int]:
    """Token ids of the label names joined by spaces, without special tokens."""
    ids = tokenizer(" ".join(label_names), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"label_names {tuple(label_names)!r} tokenize to nothing")
    return list(ids)


@torch.no_grad()
def encode_labels(backbone: nn.Module, tokenizer: Any, label_names: Sequence[str], pooling: str) -> Tensor:
    """``[C, H]``: the frozen ``backbone``'s pooled encoding of each label text, encoded like an input."""
    enc = tokenizer(list(label_names), padding=True, return_tensors="pt").to(_device(backbone))
    hidden = backbone(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    return pool(hidden, enc["attention_mask"], pooling)


@torch.no_grad()
def label_kv(backbone: nn.Module, ids: Sequence[int]) -> Tensor:
    """The frozen ``backbone``'s per-layer keys and values of ``ids``, in PEFT's prefix layout.

    An explicitly passed cache is filled by every attention layer, also BERT's, which ignores
    ``use_cache=True`` as an encoder. For a causal model the prefix then equals the label text
    prepended as real tokens (the keys carry their rotary positions ``0 .. T-1``).
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    backbone(input_ids=torch.tensor([list(ids)], device=_device(backbone)), past_key_values=cache, use_cache=True)
    return kv_to_prefix([layer.keys[0] for layer in cache.layers], [layer.values[0] for layer in cache.layers])


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class LabelTuningClassifier(nn.Module):
    """A frozen ``backbone`` with a label-derived prompt or prefix, classifying by scaled cosine.

    Args:
        backbone: a transformers base model returning ``last_hidden_state`` (``BertModel``,
            ``LlamaModel``); it is wrapped by PEFT and frozen.
        tokenizer: its tokenizer (with a pad token); used here only to encode the label texts.
        label_names: one text per class, in class-index order.
        regime: ``"prompt"`` (soft prompt from the label tokens' input embeddings) or
            ``"prefix"`` (per-layer K/V prefix from the label text's own keys and values).
        num_virtual_tokens: prompt / prefix length; default the label text's token count
            (the label tokens are tiled or cut to fit otherwise).
        pooling: ``"mean"`` or ``"last"``; default by model family (:func:`default_pooling`).
        scale: cosine-to-logit scale (inverse temperature).
        learnable_scale: train ``log(scale)`` too.

    ``forward(input_ids, attention_mask, labels=None)`` returns a ``SequenceClassifierOutput``;
    other tokenizer outputs (``token_type_ids``) are accepted and ignored, single-segment inputs.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any,
        label_names: Sequence[str],
        regime: str = "prompt",
        num_virtual_tokens: Optional[int] = None,
        pooling: Optional[str] = None,
        scale: float = DEFAULT_SCALE,
        learnable_scale: bool = False,
    ) -> None:
        super().__init__()
        from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

        if regime not in REGIMES:
            raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
        if isinstance(backbone, PeftModel):
            raise ValueError("backbone is already a PeftModel (LoRA?); L-Tuning needs the plain pretrained model")
        if len(label_names) < 2:
            raise ValueError(f"label_names needs at least 2 classes, got {tuple(label_names)!r}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if num_virtual_tokens is not None and num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
        self.regime, self.label_names = regime, tuple(label_names)
        self.pooling = pooling or default_pooling(backbone)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")

        ids = label_token_ids(tokenizer, label_names)
        self.init_token_ids = tile_ids(ids, num_virtual_tokens or len(ids))
        n = len(self.init_token_ids)
        with eval_mode(backbone):
            label_embeddings = encode_labels(backbone, tokenizer, label_names, self.pooling)
            prefix = label_kv(backbone, self.init_token_ids) if regime == "prefix" else None
        self.label_embeddings = nn.Parameter(label_embeddings.clone())
        log_scale = torch.tensor(math.log(scale), device=label_embeddings.device)
        if learnable_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

        # PEFT's TEXT init would reload the tokenizer by path and keep its special tokens;
        # build with RANDOM init and copy the label tokens' embeddings in instead.
        config = (PrefixTuningConfig if regime == "prefix" else PromptTuningConfig)(
            task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=n)
        # get_peft_model consumes RNG for the RANDOM init, which is overwritten below
        with torch.random.fork_rng(devices=[]):
            self.peft_model = get_peft_model(backbone, config)
        backbone.requires_grad_(False)
        weight = self.peft_model.prompt_encoder["default"].embedding.weight
        with torch.no_grad():
            init = prefix if prefix is not None else backbone.get_input_embeddings().weight[self.init_token_ids]
            if init.shape != weight.shape:
                raise ValueError(f"{regime} init of shape {tuple(init.shape)} does not fit PEFT's "
                                 f"{tuple(weight.shape)} for model_type {backbone.config.model_type!r}")
            weight.copy_(init)

    @property
    def scale(self) -> Tensor:
        """The current cosine-to-logit scale."""
        return self.log_scale.exp()

    @property
    def num_virtual_tokens(self) -> int:
        """Length of the prompt / prefix."""
        return len(self.init_token_ids)

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """``[B, H]``: the pooled representation of the inputs with the prompt / prefix attached."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.peft_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.regime == "prompt":
            # the soft prompt's own outputs come first; pool over the real input tokens only
            attention_mask = F.pad(attention_mask, (hidden.shape[1] - attention_mask.shape[1], 0))
        return pool(hidden, attention_mask, self.pooling)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        **unused: Any,
    ) -> Any:
        """Scaled-cosine logits ``[B, C]``, and the cross-entropy loss when ``labels`` are given."""
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = cosine_logits(self.encode(input_ids, attention_mask), self.label_embeddings, self.scale)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def backbone_and_tokenizer(model: nn.Module, tokenizer: Any) -> tuple[nn.Module, Any]:
    """The pretrained base model and raw HF tokenizer behind a benchmark factory's output.

    ``BertForSequenceClassification`` gives its ``base_model`` (the fresh head is dropped);
    a ``VerbalizerLM`` (attribute ``.lm``) gives ``lm.base_model`` and its ``PromptTokenizer``'s
    raw ``.tokenizer``. A decoder's tokenizer is copied (the factory's may be shared), given
    ``pad = eos`` if it has no pad token, and pads on the right, so positions of real tokens do not
    depend on the batch; pooling finds the last real token either way.
    """
    from peft import PeftModel

    lm = getattr(model, "lm", model)
    if isinstance(lm, PeftModel):
        raise ValueError("model is PEFT-wrapped (LoRA?); L-Tuning freezes the pretrained model: drop the LoRA")
    backbone = getattr(lm, "base_model", lm)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if default_pooling(backbone) == "last":
        tokenizer = copy.deepcopy(tokenizer)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("tokenizer has neither a pad nor an eos token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
    elif tokenizer.pad_token is None:
        raise ValueError("tokenizer has no pad token")
    return backbone, tokenizer


def prepare_ltuning(
    regime: str,
    num_virtual_tokens: Optional[int] = None,
    *,
    scale: float = DEFAULT_SCALE,
    learnable_scale: bool = False,
) -> Callable[[nn.Module, Any], tuple[nn.Module, Any]]:
    """The few-shot benchmark's ``prepare`` hook: ``hook(model, ctx) -> (classifier, tokenizer)``.

    Label names come from ``ctx.task.label_names``; ``ctx.tokenizer`` is the factory's tokenizer.
    The returned tokenizer is the raw HF one (for SmolLM2 the ``PromptTokenizer``'s template is
    dropped: L-Tuning reads the input's own representation, no verbalizer prompt).

    >>> prepare_ltuning("suffix")
    Traceback (most recent call last):
    ValueError: regime must be one of ('prompt', 'prefix'), got 'suffix'
    """
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    if num_virtual_tokens is not None and num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")

    def prepare(model: nn.Module, ctx: Any) -> tuple[nn.Module, Any]:
        backbone, tokenizer = backbone_and_tokenizer(model, ctx.tokenizer)
        classifier = LabelTuningClassifier(
            backbone, tokenizer, ctx.task.label_names, regime=regime, num_virtual_tokens=num_virtual_tokens,
            scale=scale, learnable_scale=learnable_scale)
        return classifier, tokenizer

    return prepare
