"""SetFit as a benchmark row: what a user with a few labelled examples per class and a
sentence-transformer reaches for first (Tunstall et al. 2022, the ``setfit`` package).

The row runs the real package with its default hyper-parameters: contrastive
fine-tuning of the body on pairs drawn from the K shots, then a logistic-regression
head on the body's embeddings. The body is the same local model folder the other rows
fine-tune (mean pooling, normalised, as all-MiniLM-L6-v2 is trained), built offline; only
its learning rate follows the row's lr (SetFit's ``body_learning_rate``), so it is swept
where the other rows sweep theirs. Predictions come from the fitted head. Composed with
a guided row (``setfit+cone``, ``setfit+adaptive``), the body is tuned by
:class:`~sgg_optim.GuidedAdamW` with that row's keywords, through the
``optimizer_cls_and_kwargs`` of the Hugging Face Trainer that SetFit drives
(``trainer.st_trainer``), guided toward its own EMA reference.

``setfit`` is an optional dependency: ``pip install 'sgg-optim[anchors]'``.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

EXTRA = "pip install 'sgg-optim[anchors]'"


def require_setfit() -> None:
    """Raise ``ImportError`` naming the extra when ``setfit`` is not installed."""
    if importlib.util.find_spec("setfit") is None:
        raise ImportError(f"the setfit row needs the setfit package: {EXTRA}")


class SetFitClassifier(nn.Module):
    """A fitted ``SetFitModel`` behind the interface the benchmark predicts with:
    ``model(input_ids=..., attention_mask=...).logits`` are the log-probabilities of the
    logistic-regression head on the body's sentence embeddings."""

    def __init__(self, setfit_model: Any) -> None:
        super().__init__()
        self.setfit_model = setfit_model
        self.body = setfit_model.model_body  # registered, so .eval() reaches it

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> SimpleNamespace:
        features = {"input_ids": input_ids, "attention_mask": attention_mask}
        embeddings = self.body(features)["sentence_embedding"].float().cpu().numpy()
        proba = self.setfit_model.model_head.predict_proba(embeddings)
        return SimpleNamespace(logits=torch.log(torch.as_tensor(proba).clamp_min(1e-12)))


def _text(x: Any) -> str:
    return " ".join(x) if isinstance(x, tuple) else x  # a text pair is read as one text


def prepare_setfit() -> Any:
    """A ``prepare`` hook: train SetFit on the run's shots; returns the fitted classifier."""

    def prepare(model: nn.Module, ctx: Any) -> tuple[nn.Module, Any]:
        require_setfit()
        from datasets import Dataset
        from sentence_transformers import SentenceTransformer, models
        from setfit import SetFitModel, Trainer, TrainingArguments
        from sklearn.linear_model import LogisticRegression

        from .incontext import VerbalizerLM

        if isinstance(model, VerbalizerLM):
            raise ValueError("the setfit row tunes a sentence encoder; this model is a causal LM scored by label "
                             "words: give an encoder folder (--model-kind encoder reads a decoder as one)")
        folder = getattr(getattr(model, "config", None), "_name_or_path", "")
        if not folder or not os.path.isdir(folder):
            raise ValueError(f"the setfit row builds its body from the model's local folder; "
                             f"model.config._name_or_path is {folder!r}")
        torch.manual_seed(ctx.seed)
        if os.path.isfile(os.path.join(folder, "modules.json")):
            # a sentence-transformers folder: its own pooling (CLS, mean, ...) and normalisation
            body = SentenceTransformer(folder, device="cpu")
            body.max_seq_length = ctx.cfg.max_length
            encoder = body[0]
        else:  # a plain encoder folder: mean pooling and normalisation, as all-MiniLM-L6-v2's own modules
            encoder = models.Transformer(folder, max_seq_length=ctx.cfg.max_length)
            pooling = models.Pooling(encoder.get_word_embedding_dimension(), "mean")
            body = SentenceTransformer(modules=[encoder, pooling, models.Normalize()], device="cpu")
        tok = getattr(encoder, "tokenizer", None)
        if tok is not None and tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token  # as the encoder rows pad (models.encoder_factory)
        head = LogisticRegression(random_state=ctx.seed)
        setfit_model = SetFitModel(model_body=body, model_head=head)
        with tempfile.TemporaryDirectory(prefix="sgg-setfit-") as out:
            kwargs: dict[str, Any] = {"output_dir": out, "seed": ctx.seed, "save_strategy": "no",
                                      "report_to": "none", "show_progress_bar": False}
            if ctx.lr:
                kwargs["body_learning_rate"] = ctx.lr
            data = Dataset.from_dict({"text": [_text(t) for t in ctx.train_texts],
                                      "label": list(ctx.train_labels)})
            trainer = Trainer(model=setfit_model, args=TrainingArguments(**kwargs), train_dataset=data)
            if ctx.guidance is not None:
                # SetFit tunes the body with a sentence-transformers (Hugging Face) Trainer;
                # its documented optimizer_cls_and_kwargs takes the guided optimizer.
                from ..adamw import GuidedAdamW

                args = trainer.st_trainer.args  # the Trainer passes none of these to a class given this way
                trainer.st_trainer.optimizer_cls_and_kwargs = (GuidedAdamW, {
                    **ctx.guidance, "lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2),
                    "eps": args.adam_epsilon, "weight_decay": args.weight_decay})
            trainer.train()
        return SetFitClassifier(setfit_model), ctx.tokenizer

    return prepare
