"""SGG's exact objective: gradcheck of the double backward, reductions to plain L, the
reference paths (captured Reference by name, EMA of task gradients) and argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from sgg_optim import Reference, capture_reference
from sgg_optim.methods.sgg_exact import (SGGObjective, select_parameters, sgg_exact_loss, sgg_exact_objective,
                                         sgg_penalty)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second OpenMP thread only waits on a busy shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(dtype)


def data(dtype: torch.dtype = torch.float32, seed: int = 1, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=dtype), torch.randint(0, 2, (n,), generator=g)


def ce(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x), y)


def plain_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(ce(model, x, y), list(model.parameters())))


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def cosine(a, b) -> float:
    a, b = flat(a).double(), flat(b).double()
    return float(a @ b / (a.norm() * b.norm()))


class Wrapped(torch.nn.Module):
    """A model called like the benchmark's: ``model(**batch).loss``."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x, labels):
        return type("Out", (), {"loss": torch.nn.functional.cross_entropy(self.net(x), labels)})


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def bert_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, 5:] = 0
    return {"input_ids": torch.randint(1, 100, (4, 7), generator=g), "attention_mask": mask,
            "labels": torch.randint(0, 2, (4,), generator=g)}


# -- the math --------------------------------------------------------------------------
def test_gradcheck_both_terms_active_float64():
    model = mlp(torch.float64)
    x, y = data(torch.float64)
    names = [n for n, _ in model.named_parameters()]
    theta = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    r = [torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7 + i))
         for i, p in enumerate(theta)]
    g0 = torch.autograd.grad(ce(model, x, y), list(model.parameters()))
    tau = 0.5 * float(flat(g0).norm())  # relu well inside its active region

    def objective(*params):
        loss = torch.nn.functional.cross_entropy(functional_call(model, dict(zip(names, params)), (x,)), y)
        total, _ = sgg_exact_loss(loss, params, r, lambda_dir=0.7, lambda_mag=0.3, tau=tau)
        return total

    _, fig = sgg_exact_loss(ce(model, x, y), list(model.parameters()), r, lambda_dir=0.7, lambda_mag=0.3, tau=tau)
    assert float(fig["mag_penalty"]) > 0 and abs(float(fig["cos"])) < 0.9
    assert torch.autograd.gradcheck(objective, theta, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_penalty_values_match_formula():
    g = [torch.tensor([3.0, 0.0]), None, torch.tensor([4.0])]
    r = [torch.tensor([1.0, 1.0]), torch.tensor([5.0]), None]
    pen, fig = sgg_penalty(g, r, lambda_dir=2.0, lambda_mag=0.5, tau=1.0)
    cos = 3.0 / (5.0 * math.sqrt(2 + 25))  # None grad counts as zero, r still in |r|
    assert float(fig["cos"]) == pytest.approx(cos, rel=1e-6)
    assert float(pen) == pytest.approx(2.0 * (1 - cos) + 0.5 * 16.0, rel=1e-6)


def test_zero_lambdas_give_plain_gradient_exactly():
    model = mlp()
    x, y = data()
    expected = plain_grads(model, x, y)
    loss = ce(model, x, y)
    total, fig = sgg_exact_loss(loss, list(model.parameters()), None, lambda_dir=0.0, lambda_mag=0.0, tau=0.0)
    assert total is loss and math.isnan(float(fig["cos"]))
    total.backward()
    assert all(torch.equal(p.grad, e) for p, e in zip(model.parameters(), expected))


def test_objective_with_zero_lambdas_is_plain_loss():
    model = Wrapped(mlp())
    x, y = data()
    expected = plain_grads(model.net, x, y)
    objective = SGGObjective(model, lambda_dir=0.0, lambda_mag=0.0, warmup_steps=0)
    for _ in range(3):  # also after "warmup": nothing is ever added
        model.zero_grad()
        objective(model, {"x": x, "labels": y}).backward()
        assert all(torch.equal(p.grad, e) for p, e in zip(model.parameters(), expected))


def test_direction_term_pulls_gradient_toward_reference():
    model = mlp(seed=3)
    x, y = data(seed=4, n=16)
    params = list(model.parameters())
    r = [torch.randn(p.shape, generator=torch.Generator().manual_seed(11 + i)) for i, p in enumerate(params)]
    before = cosine(plain_grads(model, x, y), r)
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(15):  # descend on the direction term alone
        grads = torch.autograd.grad(ce(model, x, y), params, create_graph=True)
        pen, _ = sgg_penalty(grads, r, lambda_dir=1.0, lambda_mag=0.0, tau=0.0)
        opt.zero_grad()
        pen.backward()
        opt.step()
    after = cosine(plain_grads(model, x, y), r)
    assert after > before + 0.1


@pytest.mark.parametrize("bad", ["zero", "nan", "none", "inf"])
def test_unusable_reference_turns_direction_off_without_nan(bad):
    model = mlp()
    x, y = data()
    params = list(model.parameters())
    expected = plain_grads(model, x, y)
    fill = {"zero": 0.0, "nan": math.nan, "inf": math.inf}.get(bad)
    r = None if bad == "none" else [torch.full_like(p, fill) for p in params]
    total, fig = sgg_exact_loss(ce(model, x, y), params, r, lambda_dir=1.0, lambda_mag=0.0, tau=0.0)
    assert not bool(fig["direction"]) and float(fig["dir_penalty"]) == 0.0
    total.backward()
    assert all(torch.equal(p.grad, e) for p, e in zip(params, expected))
    # with the magnitude term on, the double backward stays finite
    model.zero_grad()
    total, _ = sgg_exact_loss(ce(model, x, y), params, r, lambda_dir=1.0, lambda_mag=1.0, tau=0.0)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in params) and torch.isfinite(total)


def test_zero_gradient_gives_finite_penalty_gradient():
    w = torch.zeros(3, requires_grad=True)
    total, fig = sgg_exact_loss((w ** 2).sum(), [w], [torch.ones(3)], lambda_dir=1.0, lambda_mag=1.0, tau=0.0)
    total.backward()
    assert torch.isfinite(w.grad).all() and float(fig["cos"]) == 0.0


@pytest.mark.parametrize("kwargs, name", [
    ({"lambda_dir": -0.1}, "lambda_dir"), ({"lambda_mag": -1.0}, "lambda_mag"), ({"tau": -1.0}, "tau"),
    ({"tau": math.nan}, "tau"), ({"eps": 0.0}, "eps"), ({"lambda_dir": math.inf}, "lambda_dir"),
])
def test_bad_weights_raise_naming_parameter(kwargs, name):
    w = torch.ones(2, requires_grad=True)
    args = {"lambda_dir": 0.1, "lambda_mag": 0.1, "tau": 1.0, **kwargs}
    with pytest.raises(ValueError, match=name):
        sgg_exact_loss((w ** 2).sum(), [w], None, **args)
    if name != "eps":
        with pytest.raises(ValueError, match=name):
            sgg_exact_objective(**args)


@pytest.mark.parametrize("kwargs, name", [
    ({"ema_beta": 1.0}, "ema_beta"), ({"norm_beta": -0.1}, "norm_beta"), ({"warmup_steps": -1}, "warmup_steps"),
    ({"tau_factor": 0.0}, "tau_factor"), ({"params": ["no-such-layer"]}, "params"), ({"params": "net"}, "params"),
])
def test_bad_objective_options_raise_naming_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SGGObjective(Wrapped(mlp()), **kwargs)


def test_mismatched_reference_length_raises():
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="reference"):
        sgg_exact_loss((w ** 2).sum(), [w], [None, None], lambda_dir=0.1, lambda_mag=0.0, tau=0.0)


# -- the stateful shell ------------------------------------------------------------------
def test_captured_reference_is_used_by_name_on_tiny_bert():
    model = tiny_bert()
    ref = capture_reference(model, [bert_batch(s) for s in range(3)])
    objective = SGGObjective(model, ref, lambda_dir=0.5, lambda_mag=0.0, params=["layer.1.", "classifier"])
    chosen = [n for n, _ in objective.named]
    assert chosen and all("layer.1." in n or "classifier" in n for n in chosen)
    batch = bert_batch(10)
    total = objective(model, batch)
    grads = torch.autograd.grad(model(**batch).loss, objective.params)
    expected = cosine(grads, [ref[n] for n in chosen])
    assert objective.stats["direction"] == 1.0  # a frozen reference needs no warmup
    assert objective.stats["cos"] == pytest.approx(expected, abs=1e-5)
    assert float(total.detach()) == pytest.approx(objective.stats["loss"] + 0.5 * (1 - expected), abs=1e-5)

    # an unbound reference with the same tensors in another order is looked up by name too
    shuffled = Reference({n: ref[n] for n in reversed(ref.names)})
    objective = SGGObjective(model, shuffled, lambda_dir=0.5, lambda_mag=0.0, params=["layer.1.", "classifier"])
    objective(model, batch)
    assert objective.stats["cos"] == pytest.approx(expected, abs=1e-5)


def test_reference_missing_a_chosen_parameter_raises_naming_it():
    model = tiny_bert()
    ref = Reference({"classifier.weight": torch.ones(2, 32)})
    SGGObjective(model, ref, params=["classifier.weight"])  # covered: fine
    with pytest.raises(ValueError, match="classifier.bias"):
        SGGObjective(model, ref, params=["classifier"])


def test_ema_reference_updates_only_on_finite_steps():
    model = Wrapped(mlp())
    x, y = data()
    beta = 0.8
    objective = SGGObjective(model, lambda_dir=1.0, lambda_mag=0.5, ema_beta=beta, norm_beta=0.5,
                             tau_factor=1.5, warmup_steps=2)
    g1 = plain_grads(model.net, x, y)
    objective(model, {"x": x, "labels": y}).backward()
    assert objective.accepted == 1 and objective.stats["direction"] == 0.0  # warming up
    assert all(torch.equal(e, g) for e, g in zip(objective.ema, g1))

    before = [e.clone() for e in objective.ema]
    bad = x.clone()
    bad[0, 0] = math.nan
    objective(model, {"x": bad, "labels": y})
    assert objective.accepted == 1 and objective.skipped == 1 and objective.stats["skipped"] == 1.0
    assert all(torch.equal(e, b) for e, b in zip(objective.ema, before))

    x2, y2 = data(seed=5)
    g2 = plain_grads(model.net, x2, y2)
    objective(model, {"x": x2, "labels": y2})
    assert objective.accepted == 2
    assert all(torch.allclose(e, beta * a + (1 - beta) * b) for e, a, b in zip(objective.ema, g1, g2))
    n1, n2 = flat(g1).norm().item(), flat(g2).norm().item()

    x3, y3 = data(seed=6)
    g3 = plain_grads(model.net, x3, y3)
    objective(model, {"x": x3, "labels": y3})  # warm: both terms on, against the EMA of steps 1-2
    assert objective.stats["direction"] == 1.0
    assert objective.stats["cos"] == pytest.approx(cosine(g3, [beta * a + (1 - beta) * b for a, b in zip(g1, g2)]),
                                                   abs=1e-5)
    assert objective.stats["tau"] == pytest.approx(1.5 * (0.5 * n1 + 0.5 * n2), rel=1e-5)


def test_objective_factory_builds_fresh_state_per_run_and_trains_bert():
    hook = sgg_exact_objective(lambda_dir=0.2, lambda_mag=0.1, warmup_steps=1)
    model = tiny_bert()
    first, second = hook(model, None), hook(model, None)
    assert first is not second and isinstance(first, SGGObjective)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for s in range(3):
        opt.zero_grad()
        total = first(model, bert_batch(s))
        total.backward()
        opt.step()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert first.accepted == 3 and first.stats["direction"] == 1.0 and second.accepted == 0
    assert float(total.detach()) >= first.stats["loss"]


def test_select_parameters_filters():
    model = tiny_bert()
    model.bert.embeddings.requires_grad_(False)
    names = [n for n, _ in select_parameters(model)]
    assert names and not any("embeddings" in n for n in names)
    assert [n for n, _ in select_parameters(model, lambda n, p: p.ndim == 1 and "classifier" in n)] == \
        ["classifier.bias"]
