"""PEFT integration: guide the adapter parameters of a (possibly 4-bit) model.

Guidance runs over whatever the optimizer holds; for QLoRA that must be the adapters
only, so the frozen (4-bit packed) base weights are never in a param group and their
bytes never change. These helpers pick the adapters and check the rest is frozen.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import Tensor, nn

# the attention projections LoRA adapts by default (Hu et al. 2021: query and value),
# under BERT's, Llama's (and BART's), DistilBERT's and MPNet's module names; other models
# get PEFT's own table by model_type (GPT-2's fused c_attn, DeBERTa-v2's query_proj)
ATTENTION_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("q", "v"))


def lora_config(model: nn.Module, r: int = 8, *, target_modules: Optional[Sequence[str]] = None,
                lora_alpha: Optional[int] = None, **kwargs: Any) -> Any:
    """The one LoRA setting the library builds: rank ``r``, alpha ``2 r``, no dropout, on
    the attention query/value projections ``model`` has (or ``target_modules``); other
    ``peft.LoraConfig`` keywords pass through (``task_type``, ``modules_to_save``).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                             intermediate_size=16))
        >>> cfg = lora_config(bert, r=4)
        >>> sorted(cfg.target_modules), cfg.lora_alpha
        (['query', 'value'], 8)
    """
    from peft import LoraConfig

    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    if target_modules is None:
        target_modules = attention_targets(model)
    return LoraConfig(r=r, lora_alpha=lora_alpha or 2 * r, lora_dropout=0.0, target_modules=list(target_modules),
                      **kwargs)


def attention_targets(model: nn.Module) -> list[str]:
    """The query/value projections of ``model`` LoRA adapts by default: the module names in
    :data:`ATTENTION_TARGETS` it has (matched whole, as the last part of a module's name),
    else PEFT's table for its ``config.model_type``; ``ValueError`` if neither finds one."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    last = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    # the first family of names the model has (a model with query/value never gets "q"/"v" too)
    found = next(([t for t in family if t in last] for family in ATTENTION_TARGETS if set(family) & last), [])
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        found = [t for t in PEFT_TARGETS.get(model_type, ()) if t in last]
    if not found:
        known = ", ".join("/".join(family) for family in ATTENTION_TARGETS)
        raise ValueError(f"{type(model).__name__} has no attention projection LoRA knows by name "
                         f"({known}, nor PEFT's for its model type): pass target_modules")
    return found


def adapter_named_parameters(model: nn.Module) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` of every trainable parameter: the adapters of a PEFT model.

    Pass the list to an optimizer (named, so guidance messages name parameters).

    Example:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> base = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> model = get_peft_model(base, LoraConfig(r=2, target_modules=["0"]))
        >>> [n.split(".")[-2] for n, _ in adapter_named_parameters(model)]
        ['default', 'default']
    """
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def check_only_adapters_train(model: nn.Module, adapter_marker: str = "lora_",
                              allowed: tuple[str, ...] = ("modules_to_save",)) -> None:
    """Raise ``ValueError`` naming the first trainable parameter that is not an adapter.

    Parameters under PEFT's ``modules_to_save`` are allowed: PEFT keeps them trainable on
    purpose (``task_type="SEQ_CLS"`` does so for the classification head), as full copies
    beside the frozen originals, so the base weights still never change.

    Example:
        >>> import torch
        >>> check_only_adapters_train(torch.nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        ValueError: parameter 'weight' trains but is not an adapter (no 'lora_' in its name); freeze it ...
    """
    for name, p in model.named_parameters():
        if p.requires_grad and adapter_marker not in name and not any(a in name for a in allowed):
            raise ValueError(f"parameter {name!r} trains but is not an adapter (no {adapter_marker!r} in its "
                             "name); freeze it (peft.get_peft_model does) before building the optimizer, or "
                             "list its module in LoraConfig(modules_to_save=[...]) if it should train")


def base_weight_bytes(model: nn.Module) -> dict[str, Any]:
    """A copy of every frozen parameter and buffer (4-bit packed weights included), to
    check later that training left them byte-identical.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 2).requires_grad_(False)
        >>> before = base_weight_bytes(layer)
        >>> all(torch.equal(t, dict(layer.named_parameters())[n]) for n, t in before.items())
        True
    """
    out: dict[str, Any] = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return out
