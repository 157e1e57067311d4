"""The Trainer and PEFT set-ups the usage guide recommends, as a new user runs them."""

from __future__ import annotations

import pytest
import torch

from sgg_optim.integrations.peft import check_only_adapters_train


def test_peft_classification_head_in_modules_to_save_is_accepted():
    peft = pytest.importorskip("peft")
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=2))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert any("modules_to_save" in n for n in trainable)  # PEFT keeps the head trainable
    check_only_adapters_train(lora)
    next(p for n, p in lora.named_parameters() if "word_embeddings" in n).requires_grad_(True)
    with pytest.raises(ValueError, match="word_embeddings.*trains but is not an adapter"):
        check_only_adapters_train(lora)


def _trainer(max_grad_norm, tmp_path, learning_rate=1e-3, **args):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from sgg_optim import GuidedAdamW
    from sgg_optim.integrations.transformers import GuidanceCallback

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=2))
    data = [{"input_ids": torch.randint(0, 50, (8,)), "labels": i % 2} for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, logging_steps=2,
                             max_grad_norm=max_grad_norm, learning_rate=learning_rate, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, **args)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=[GuidanceCallback()],
                   optimizer_cls_and_kwargs=(GuidedAdamW, {"lr": 1e-3, "warmup_steps": 0}))


def test_callback_warns_once_when_the_trainer_clips_before_guidance(tmp_path, recwarn):
    _trainer(1.0, tmp_path).train()
    clip = [w for w in recwarn if "max_grad_norm=1.0 clips" in str(w.message)]
    assert len(clip) == 1


def test_callback_is_quiet_and_logs_guidance_with_max_grad_norm_0(tmp_path, recwarn):
    trainer = _trainer(0.0, tmp_path)
    trainer.train()
    assert not [w for w in recwarn if "clips gradients before" in str(w.message)]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all("guidance/cos" in h and "guidance/grad_norm" in h for h in logs)


def test_callback_warns_when_the_optimizer_keywords_leave_out_the_trainers_learning_rate(tmp_path, recwarn):
    # optimizer_cls_and_kwargs gets no learning_rate from the Trainer: GuidedAdamW's own 1e-3 ran silently
    trainer = _trainer(0.0, tmp_path, learning_rate=5e-5)
    trainer.train()
    lr = [w for w in recwarn if "TrainingArguments.learning_rate=5e-05" in str(w.message)]
    assert len(lr) == 1 and "learning rate is 0.001" in str(lr[0].message)
    assert trainer.state.log_history[0]["learning_rate"] > 5e-5  # what it warns about: the run used 1e-3


def test_callback_is_quiet_about_the_learning_rate_under_a_warm_up_schedule(tmp_path, recwarn):
    trainer = _trainer(0.0, tmp_path, warmup_steps=2)  # the schedule starts the lr at 0
    trainer.train()
    assert trainer.state.log_history[0]["learning_rate"] < 1e-3
    assert not [w for w in recwarn if "TrainingArguments.learning_rate" in str(w.message)]


def test_callback_adds_guidance_to_the_history_of_a_step_that_logged_nan():
    # a skipped (non-finite) step logs grad_norm nan; nan != nan once kept its figures out of log_history
    from types import SimpleNamespace

    from sgg_optim import GuidedAdamW
    from sgg_optim.integrations.transformers import GuidanceCallback

    m = torch.nn.Linear(3, 1)
    opt = GuidedAdamW(m.parameters(), lr=1e-3)
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    entry = {"loss": 1.0, "grad_norm": float("nan"), "step": 3}
    state = SimpleNamespace(log_history=[entry], global_step=3)
    GuidanceCallback().on_log(None, state, None, logs={"loss": 1.0, "grad_norm": float("nan")}, optimizer=opt)
    assert entry["guidance/step"] == 1 and "guidance/grad_norm" in entry
