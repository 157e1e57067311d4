"""ProMoT: two-stage prompt-then-model tuning (Wang et al. 2023, arXiv:2211.00635).

Stage 1 trains a soft prompt (PEFT prompt tuning) with the model frozen, so the prompt
absorbs the task's *format*. Stage 2 fine-tunes the model (full, or LoRA) with that prompt
attached and frozen. Evaluated on other tasks without the prompt, the model has been
specialised less and keeps more of its general (in-context) ability.

Two model shapes are supported:

- a sequence classifier (``BertForSequenceClassification``): wrapped with PEFT task type
  ``SEQ_CLS``; its fresh head is trained in both stages (PEFT's ``modules_to_save`` copy);
- a label-word scorer with a causal LM in ``.lm`` (``VerbalizerLM``): ``.lm`` is wrapped with
  task type ``CAUSAL_LM`` and the scorer is returned with the wrapped ``.lm`` in place.

LoRA: PEFT refuses a second adapter *type* in one ``PeftModel`` ("Cannot combine adapters
with different peft types"), so LoRA lives as layers injected in the transformers model
(``inject_adapter_in_model``, or the inner model of a LoRA ``PeftModel``) and the prompt's
``PeftModel`` wraps that. Stage 2 then trains the LoRA weights (and the head) only.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
    ...                                                 num_attention_heads=2, intermediate_size=16))
    >>> model = attach_prompt(bert, num_virtual_tokens=4, seed=0)
    >>> sorted(n for n, p in model.named_parameters() if p.requires_grad)[-1]
    'prompt_encoder.default.embedding.weight'
    >>> _ = unfreeze_for_stage2(model)
    >>> prompt_model(model).prompt_encoder.default.embedding.weight.requires_grad
    False
    >>> without_prompt(model) is bert
    True
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any, Callable, Iterable, Literal, Optional, Union

import torch
from torch import Tensor, nn

Batch = dict[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]
NamedParams = list[tuple[str, nn.Parameter]]
OptimizerFactory = Callable[[NamedParams], torch.optim.Optimizer]

__all__ = [
    "attach_prompt", "prepare_promot", "promot", "prompt_model", "train_model", "train_prompt",
    "trainable_named_parameters", "unfreeze_for_stage2", "without_prompt",
]


def _is_peft(module: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(module, PeftModel)


def _is_prompt_peft(module: nn.Module) -> bool:
    return _is_peft(module) and module.active_peft_config.is_prompt_learning


def _strip_lora_wrapper(module: nn.Module) -> nn.Module:
    """The transformers model inside a LoRA ``PeftModel``; its LoRA layers stay injected."""
    if _is_peft(module) and not module.active_peft_config.is_prompt_learning:
        return module.get_base_model()
    return module


def prompt_model(model: nn.Module) -> nn.Module:
    """The prompt-tuning ``PeftModel`` in ``model``: ``model`` itself, or its ``.lm``.

    Raises:
        ValueError: ``model`` carries no soft prompt (``attach_prompt`` was not called).
    """
    for candidate in (model, getattr(model, "lm", None)):
        if isinstance(candidate, nn.Module) and _is_prompt_peft(candidate):
            return candidate
    raise ValueError(f"model ({type(model).__name__}) has no soft prompt; call attach_prompt first")


def attach_prompt(model: nn.Module, *, num_virtual_tokens: int = 20,
                  init: Literal["SAMPLE_VOCAB", "RANDOM"] = "SAMPLE_VOCAB",
                  seed: Optional[int] = None) -> nn.Module:
    """Wrap ``model`` with a trainable soft prompt and freeze everything else but a fresh head.

    A model with a causal LM in ``.lm`` gets ``.lm`` wrapped (``CAUSAL_LM``) and is returned
    itself; any other model is wrapped whole as a sequence classifier (``SEQ_CLS``, whose
    ``classifier``/``score`` head PEFT keeps trainable). A LoRA ``PeftModel`` (the model or its
    ``.lm``) is unwrapped first: its LoRA layers stay in place, frozen until stage 2.
    ``init="SAMPLE_VOCAB"`` starts the prompt from embeddings of random vocabulary tokens
    (drawn from ``seed`` when given, so runs repeat).
    """
    from peft import PromptTuningConfig, get_peft_model

    if num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
    if init not in ("SAMPLE_VOCAB", "RANDOM"):  # TEXT init would load a tokenizer from the hub
        raise ValueError(f"init must be 'SAMPLE_VOCAB' or 'RANDOM', got {init!r}")
    model = _strip_lora_wrapper(model)
    decoder = isinstance(getattr(model, "lm", None), nn.Module)
    host = _strip_lora_wrapper(model.lm) if decoder else model
    if _is_prompt_peft(host):
        raise ValueError("model already has a soft prompt")
    config = PromptTuningConfig(task_type="CAUSAL_LM" if decoder else "SEQ_CLS",
                                num_virtual_tokens=num_virtual_tokens, prompt_tuning_init=init)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        if seed is not None:
            torch.manual_seed(seed)
        # an unwrapped LoRA model still carries PEFT layers; wrapping it again is the intent here
        warnings.filterwarnings("ignore", message=".*modify a model with PEFT for a second time.*")
        wrapped = get_peft_model(host, config)
    if not decoder:
        return wrapped
    model.lm = wrapped
    return model


def trainable_named_parameters(model: nn.Module) -> NamedParams:
    """``(name, parameter)`` for every parameter that requires grad (what an optimizer gets)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _fit(model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer,
         loss_fn: Optional[LossFn]) -> list[float]:
    from ..fewshot.training import fit  # the benchmark's one training loop

    return fit(model, optimizer, batches, loss_fn)


def train_prompt(model: nn.Module, batches: Iterable[Batch], *, lr: float = 3e-2, weight_decay: float = 0.0,
                 loss_fn: Optional[LossFn] = None, head_lr: Optional[float] = None) -> list[float]:
    """Stage 1: AdamW on the prompt (and a fresh head) of an ``attach_prompt`` model; the losses.

    No weight decay by default: decay would pull the prompt toward the zero embedding,
    which is not a neutral prompt. ``head_lr`` (default ``lr``) is the learning rate of the
    other trainable parameters (a fresh classification head): a prompt needs a large one,
    a linear head trained that fast becomes overconfident before stage 2 starts.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if head_lr is not None and head_lr <= 0:
        raise ValueError(f"head_lr must be > 0, got {head_lr}")
    prompt_model(model)  # fail early on a model without a prompt
    named = trainable_named_parameters(model)
    groups = [{"params": [p for n, p in named if "prompt_encoder" in n], "lr": lr},
              {"params": [p for n, p in named if "prompt_encoder" not in n], "lr": lr if head_lr is None else head_lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)
    return _fit(model, batches, opt, loss_fn)


def unfreeze_for_stage2(model: nn.Module) -> nn.Module:
    """Freeze the prompt; make the model trainable: all of it, or its LoRA weights if it has LoRA.

    The trained copy of a PEFT-saved head stays trainable; its bypassed original stays frozen.
    Returns ``model`` (changed in place).
    """
    peft = prompt_model(model)
    base = peft.get_base_model()
    has_lora = any("lora_" in n for n, _ in base.named_parameters())
    for name, p in base.named_parameters():
        if ".original_module." in name:
            p.requires_grad_(False)
        elif has_lora:
            p.requires_grad_("lora_" in name or ".modules_to_save." in name)
        else:
            p.requires_grad_(True)
    peft.prompt_encoder.requires_grad_(False)
    return model


def train_model(model: nn.Module, batches: Iterable[Batch], *, lr: float = 2e-5,
                optimizer_factory: Optional[OptimizerFactory] = None,
                loss_fn: Optional[LossFn] = None) -> list[float]:
    """Stage 2: train ``model``'s trainable parameters; the losses.

    ``optimizer_factory(named_params)`` builds the optimizer (e.g. ``GuidedAdamW`` for
    ``promot+cone``); by default AdamW at ``lr`` with weight decay 0.01.
    """
    named = trainable_named_parameters(model)
    if optimizer_factory is None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        opt = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=0.01)
    else:
        opt = optimizer_factory(named)
    return _fit(model, batches, opt, loss_fn)


def without_prompt(model: nn.Module) -> nn.Module:
    """``model`` with the soft prompt removed (for evaluation on other tasks), sharing all weights.

    For prompt learning, PEFT's ``get_base_model()`` is the wrapped model itself and
    ``disable_adapter()`` only swaps ``forward`` to it, so both drop the prompt and keep a
    trained head and LoRA layers. For a scorer with ``.lm`` the result is a shallow copy of the
    scorer whose ``.lm`` is the bare LM; the original keeps its prompt.
    """
    peft = prompt_model(model)
    base = peft.get_base_model()
    if peft is model:
        return base
    view = copy.copy(model)
    view._modules = {**model._modules, "lm": base}  # own module table so the original keeps its prompt
    return view


def _add_lora(model: nn.Module, lora: Any) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    from ..integrations.peft import lora_config

    host = model.lm if isinstance(getattr(model, "lm", None), nn.Module) else model
    config = lora_config(host) if lora is True else lora
    if not isinstance(config, LoraConfig):
        raise ValueError(f"lora must be a bool or a peft.LoraConfig, got {type(lora).__name__}")
    inject_adapter_in_model(config, host)
    return model


def promot(model: nn.Module, stage1_batches: Iterable[Batch], stage2_batches: Iterable[Batch], *,
           num_virtual_tokens: int = 20, prompt_lr: float = 3e-2, model_lr: float = 2e-5,
           lora: Union[bool, Any] = False, optimizer_factory: Optional[OptimizerFactory] = None,
           loss_fn: Optional[LossFn] = None, seed: Optional[int] = None) -> nn.Module:
    """Both ProMoT stages in one call; the tuned model, prompt attached (see :func:`without_prompt`).

    ``lora``: ``False`` fine-tunes the whole model in stage 2; ``True`` (r=8) or a
    ``peft.LoraConfig`` injects LoRA layers first (frozen in stage 1) and trains only those.
    ``optimizer_factory`` builds the stage-2 optimizer from the trainable named parameters.
    """
    if lora is not False:
        model = _add_lora(model, lora)
    model = attach_prompt(model, num_virtual_tokens=num_virtual_tokens, seed=seed)
    train_prompt(model, stage1_batches, lr=prompt_lr, loss_fn=loss_fn)
    unfreeze_for_stage2(model)
    train_model(model, stage2_batches, lr=model_lr, optimizer_factory=optimizer_factory, loss_fn=loss_fn)
    return model


def prepare_promot(stage1_steps: Optional[int] = None, prompt_lr: float = 3e-2, num_virtual_tokens: int = 20,
                   head_lr: float = 1e-3) -> Callable[[nn.Module, Any], tuple[nn.Module, Any]]:
    """Benchmark hook: attach a prompt, run stage 1 on the run's K-shot set, ready stage 2.

    The returned ``prepare(model, ctx)`` trains the prompt with plain AdamW at ``prompt_lr``
    (and a fresh head, at ``head_lr``) for ``stage1_steps`` steps (default ``ctx.cfg.steps``) on
    ``ctx.train_texts``/``ctx.train_labels`` shuffled by ``ctx.seed``, then freezes the prompt
    and unfreezes the model (or its LoRA weights), so the benchmark loop runs stage 2 with the
    strategy's own optimizer and learning rate. Parameter names gain PEFT's prefixes, so a
    reference that binds by name must be captured on the prepared model.
    """
    if stage1_steps is not None and stage1_steps < 0:
        raise ValueError(f"stage1_steps must be >= 0, got {stage1_steps}")
    if prompt_lr <= 0:
        raise ValueError(f"prompt_lr must be > 0, got {prompt_lr}")
    if num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")

    def prepare(model: nn.Module, ctx: Any) -> tuple[nn.Module, Any]:
        cfg = ctx.cfg
        steps = cfg.steps if stage1_steps is None else stage1_steps
        model = attach_prompt(model, num_virtual_tokens=num_virtual_tokens, seed=ctx.seed)
        # the benchmark's own batches (same order and encoding as stage 2's), for stage 1's steps
        from ..fewshot.training import batches

        data = batches(ctx.tokenizer, ctx.train_texts, ctx.train_labels, dataclasses.replace(cfg, steps=steps),
                       ctx.seed)
        with torch.random.fork_rng(devices=[]):  # dropout draws of stage 1 leave the run's RNG alone
            torch.manual_seed(ctx.seed)
            train_prompt(model, data, lr=prompt_lr, head_lr=head_lr)
        return unfreeze_for_stage2(model), ctx.tokenizer

    return prepare
