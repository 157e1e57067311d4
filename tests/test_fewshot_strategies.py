"""Strategy registry, composition, optimizers built, and LoRA vs full fine-tuning."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from sgg_optim import GuidedAdamW, Reference
from sgg_optim.fewshot import strategies
from sgg_optim.fewshot.strategies import FULL_LRS, LORA_LRS, Strategy, compose, get_strategy
from sgg_optim.fewshot.training import apply_lora


def _bert():
    cfg = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(cfg)


def test_issue_rows_are_registered():
    for name in ("adamw", "adamw-clip", "project-ema", "project-source", "cone-ema", "cone-source",
                 "blend-ema", "blend-source", "lora", "cone-sources", "cone-icl", "ltuning-prompt",
                 "ltuning-prefix", "promot", "icl-format", "sgg-exact", "pretrained", "cone-kshot",
                 "project-kshot", "adaptive", "cone-ema-w3"):
        assert name in strategies.STRATEGIES
    assert get_strategy("promot+cone").guidance["direction"] == "cone"
    assert get_strategy("promot+cone").prepare is strategies.STRATEGIES["promot"].prepare
    assert get_strategy("sgg-exact+cone-source").objective is not None
    assert get_strategy("ltuning-prompt").lr_grid == strategies.LABEL_LRS
    assert get_strategy("project-ema").guidance["direction"] == "project"
    assert get_strategy("blend-source").reference == "source"
    with pytest.raises(KeyError, match="unknown strategy 'nope'"):
        get_strategy("lora+nope")


def test_optimizers_built():
    model = _bert()
    plain = get_strategy("adamw").build_optimizer(model, 1e-3)
    assert type(plain) is torch.optim.AdamW
    guided = get_strategy("cone-ema").build_optimizer(model, 1e-3)
    assert isinstance(guided, GuidedAdamW) and guided.config.direction == "cone"
    with pytest.raises(ValueError, match="needs a source reference"):
        get_strategy("cone-source").build_optimizer(model, 1e-3)
    ref = Reference({n: torch.ones_like(p) for n, p in model.named_parameters()}).bind(model)
    assert isinstance(get_strategy("cone-source").build_optimizer(model, 1e-3, ref), GuidedAdamW)


def test_compose_for_later_methods():
    calls = []

    def hook(tag, out):
        return lambda m, ctx: (calls.append((tag, ctx.tokenizer)) or m, out)

    strategies.register(Strategy("tagger", prepare=hook("tag", "tok2")))
    strategies.register(Strategy("second", prepare=hook("second", "tok3")))
    try:
        s = get_strategy("tagger+cone-source")
        assert s.name == "tagger+cone-source" and s.reference == "source"
        assert s.guidance["direction"] == "cone" and s.lr_grid == FULL_LRS
        ctx = strategies.PrepareContext("tok1", None, (), (), None, 0, 1e-3)
        model = _bert()
        assert s.prepare(model, ctx) == (model, "tok2")
        # chained hooks: each sees the tokenizer the one before returned
        both = get_strategy("tagger+second+cone")
        assert both.prepare(model, ctx) == (model, "tok3")
        assert calls == [("tag", "tok1"), ("tag", "tok1"), ("second", "tok2")]
    finally:
        del strategies.STRATEGIES["tagger"], strategies.STRATEGIES["second"]
    with pytest.raises(ValueError, match="both set objective"):
        compose(Strategy("a", objective=lambda m, r: None), Strategy("b", objective=lambda m, r: None))
    with pytest.raises(ValueError, match="reference must be one of"):
        Strategy("bad", reference="sauce")
    lora_cone = get_strategy("lora+cone-ema")
    assert lora_cone.lora and lora_cone.lr_grid == LORA_LRS and lora_cone.guidance is not None
    with pytest.raises(ValueError, match="both set guidance"):
        compose(get_strategy("cone-ema"), get_strategy("project-ema"))


def test_lora_trains_adapters_and_head_only():
    model = apply_lora(_bert())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert any("lora_A" in n for n in trainable)
    full = sum(p.numel() for p in _bert().parameters())
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) < full / 2


@pytest.mark.parametrize("name, reference, settings", [
    ("cone-kshot", "kshot", dict(direction="cone", max_angle=60.0, magnitude="adaptive", warmup_steps=10)),
    ("project-kshot", "kshot", dict(direction="project", magnitude="off")),
    ("adaptive", "ema", dict(direction="off", magnitude="adaptive", warmup_steps=3, spike_factor=3.0)),
    ("cone-ema-w3", "ema", dict(direction="cone", max_angle=60.0, magnitude="adaptive", warmup_steps=3)),
])
def test_issue10_rows_reach_the_optimizer(name, reference, settings):
    row = get_strategy(name)
    assert row.reference == reference and row.lr_grid == FULL_LRS == (2e-5, 5e-5, 1e-4, 2e-4)
    model = _bert()
    ref = Reference({n: torch.ones_like(p) for n, p in model.named_parameters()}).bind(model)
    opt = row.build_optimizer(model, 3e-4, ref if reference == "kshot" else None)
    assert isinstance(opt, GuidedAdamW)
    assert opt.reference_mode == ("sources" if reference == "kshot" else "ema")  # the frozen K-shot reference
    for key, value in settings.items():
        assert getattr(opt.config, key) == value, key
    assert opt.param_groups[0]["lr"] == 3e-4
    if reference == "kshot":
        with pytest.raises(ValueError, match="needs a kshot reference"):
            row.build_optimizer(model, 3e-4)


def test_lp_ft_probe_phase_leaves_the_encoder_bit_identical():
    """LP-FT: the first third of the steps move only the head, then everything; guided too."""
    from test_fewshot_protocol import synthetic_task, tiny_factory

    from sgg_optim.fewshot import training
    from sgg_optim.fewshot.training import RunConfig

    task = synthetic_task()
    for name in ("lp-ft", "lp-ft+cone-kshot"):
        torch.manual_seed(0)
        model, tok = tiny_factory(task)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        strategy = get_strategy(name)
        assert strategy.probe_fraction == pytest.approx(1 / 3)
        seen = []

        def snapshot(step):
            seen.append({n: p.detach().clone() for n, p in model.named_parameters()})

        cfg = RunConfig(steps=6, batch_size=8, max_length=16)
        texts, labels = task.train_texts[:16], task.train_labels[:16]
        reference = None
        if strategy.reference == "kshot":
            reference = training.source_reference(model, tok, texts, labels, cfg)
        training.train(model, strategy, 1e-2, training.batches(tok, texts, labels, cfg, 0), cfg, reference,
                       on_step=snapshot)
        head = training.head_names(model)
        for step in (0, 1):  # the probe: 2 of 6 steps
            for n, value in seen[step].items():
                assert torch.equal(value, start[n]) != (n in head), (name, step, n)
        assert not torch.equal(seen[-1]["bert.embeddings.word_embeddings.weight"],
                               start["bert.embeddings.word_embeddings.weight"])


def test_cone_source_body_guides_the_body_and_leaves_the_head_alone():
    """The head's gradient reaches AdamW as computed; the body's is rotated onto the cone of
    its own reference (the body block's cosine, not one diluted by the head's gradient)."""
    torch.manual_seed(0)
    model = _bert()
    names = [n for n, _ in model.named_parameters()]
    # a reference far from the gradient: the cone must act on the body
    ref = Reference({n: torch.randn_like(p) for n, p in model.named_parameters()}).bind(model)
    opt = get_strategy("cone-source-body").build_optimizer(model, 1e-3, ref)
    assert [len(g["params"]) for g in opt.param_groups] == [len(names) - 2, 2]
    batch = {"input_ids": torch.randint(0, 20, (4, 6)), "labels": torch.tensor([0, 1, 0, 1])}
    model(**batch).loss.backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    seen = {}
    # what the base step sees: the guided gradients
    opt.base_optimizer.register_step_pre_hook(
        lambda o, a, k: seen.update({n: p.grad.clone() for n, p in model.named_parameters()}))
    opt.step()
    for n in names:
        if n.startswith("classifier."):
            assert torch.equal(seen[n], raw[n]), n  # pass-through
    body = [n for n in names if not n.startswith("classifier.")]
    g = torch.cat([raw[n].flatten() for n in body])
    r = torch.cat([ref[n].flatten() for n in body])
    out = torch.cat([seen[n].flatten() for n in body])
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    assert cos(g, r) < 0.5 - 1e-3  # outside the 60-degree cone: rotated onto its edge
    assert abs(cos(out, r) - 0.5) < 1e-4 and abs(float(out.norm() / g.norm()) - 1) < 1e-4
    assert all(float(ref[n].abs().sum()) > 0 for n in names)  # the caller's reference is not zeroed
    for _ in range(12):  # past the magnitude warm-up, the head's direction is still its own
        opt.zero_grad()
        model(**batch).loss.backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        for n in names:
            if n.startswith("classifier."):
                a, b = seen[n].flatten(), raw[n].flatten()
                assert float(a @ b) >= (1 - 1e-5) * float(a.norm() * b.norm()), n
    with pytest.raises(ValueError, match="guide_head=False needs guidance with scope='group'"):
        Strategy("x", guidance={"direction": "cone"}, reference="source", guide_head=False)
    Strategy("x", guidance={"direction": "cone", "scope": "tensor"}, reference="source", guide_head=False)
    with pytest.raises(ValueError, match="guide_head=False"):
        Strategy("x", guidance={"direction": "cone", "scope": "group"}, guide_head=False)
