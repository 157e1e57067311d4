"""The seed methods as benchmark rows: registered hooks reach the right method, and the
training loop runs an objective (SGG's exact loss) logging the task loss."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("peft")
from test_fewshot_protocol import synthetic_task, tiny_factory  # noqa: E402
from test_methods_ltuning import ctx_for, factory  # noqa: E402

from sgg_optim.fewshot.protocol import run_cell  # noqa: E402
from sgg_optim.fewshot.strategies import get_strategy  # noqa: E402
from sgg_optim.fewshot.training import RunConfig  # noqa: E402


@pytest.mark.parametrize("regime", ["prompt", "prefix"])
def test_ltuning_rows_build_label_tuning_classifiers(regime):
    model, tok = factory("bert")
    tuned, _ = get_strategy(f"ltuning-{regime}").prepare(model, ctx_for(tok))
    assert type(tuned).__name__ == "LabelTuningClassifier" and tuned.regime == regime
    assert sum(p.numel() for p in tuned.parameters() if p.requires_grad) < 2_000


def test_promot_row_runs_stage_one_and_freezes_the_prompt():
    model, tok = factory("bert")
    ready, same_tok = get_strategy("promot+cone").prepare(model, ctx_for(tok))
    assert same_tok is tok
    prompt = [p for n, p in ready.named_parameters() if "prompt_encoder" in n]
    assert prompt and not any(p.requires_grad for p in prompt)
    assert any(p.requires_grad for n, p in ready.named_parameters() if "encoder.layer" in n)


def test_sgg_exact_row_logs_the_task_loss():
    task = synthetic_task()
    cfg = RunConfig(steps=12, batch_size=4, max_length=12)
    plain = run_cell(task, get_strategy("adamw"), 2, 0, tiny_factory, cfg, lr=1e-3)
    exact = run_cell(task, get_strategy("sgg-exact"), 2, 0, tiny_factory, cfg, lr=1e-3)
    # same model, batch and weights at step 0: the logged loss is the task loss, not L + penalties
    assert exact["trace"]["loss"][0] == pytest.approx(plain["trace"]["loss"][0], abs=1e-6)
    # the direction term starts after the 10-step EMA warm-up; its cosine fills ref_cos
    assert all(math.isnan(c) for c in exact["trace"]["ref_cos"][:10])
    assert all(math.isfinite(c) for c in exact["trace"]["ref_cos"][10:])
    assert exact["trace"]["grad_norm"][1:] != plain["trace"]["grad_norm"][1:]
