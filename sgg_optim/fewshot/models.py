"""Model factories for the few-shot benchmark: ``task -> (fresh model, tokenizer)``.

SmolLM2-135M-Instruct classifies by label-word log-likelihood
(:class:`~sgg_optim.methods.incontext.VerbalizerLM`), the label words being the task's
``label_names``; its tokenizer is a :class:`~sgg_optim.methods.incontext.PromptTokenizer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


from ..methods.incontext import PromptTokenizer, VerbalizerLM
from .training import ModelFactory



def smollm2_factory(folder: Optional[Path] = None) -> ModelFactory:
    """A factory building SmolLM2 (fp32, fresh weights each call) as a verbalizer classifier for a task.

    ``folder`` is a plain Hugging Face model folder; by default the cached asset
    (:func:`sgg_optim.fewshot.assets.smollm2_folder`).
    """
    def build(task: Any) -> tuple[VerbalizerLM, PromptTokenizer]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        label_names = getattr(task, "label_names", None)
        if not label_names:
            raise ValueError(f"task must be a Task with label_names (the label words), got {task!r}")
        src = folder
        if src is None:
            from .assets import smollm2_folder  # written alongside; imported late so this module loads without it

            src = smollm2_folder()
        lm = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
        tok = PromptTokenizer(AutoTokenizer.from_pretrained(str(src)), label_names)
        return VerbalizerLM(lm, tok.label_token_ids), tok

    return build

