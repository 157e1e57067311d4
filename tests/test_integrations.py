"""GuidancePlugin (keywords, SGG_* variables, wrapping, logging) and the Trainer callback."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import GradientWatch, tiny_mlp, train

from sgg_optim import GuidedAdamW, GuidedOptimizer
from sgg_optim.accelerate import GuidancePlugin, find_guided, flat_stats


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("SGG_"):
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.fixture
def accelerate_state():
    """An Accelerate state for in-process tests, reset afterwards so no test leaks it."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# -- configuration ------------------------------------------------------------------------
def test_plugin_defaults_are_the_optimizer_defaults(clean_env):
    from sgg_optim import GuidanceConfig

    assert GuidancePlugin().config == GuidanceConfig()
    assert GuidancePlugin().reference == "ema"


def test_plugin_reads_typed_environment_variables(clean_env):
    clean_env.setenv("SGG_DIRECTION", "project")
    clean_env.setenv("SGG_MAX_ANGLE", "30")
    clean_env.setenv("SGG_WARMUP_STEPS", " 5 ")
    clean_env.setenv("SGG_LOG_EVERY", "2")
    plugin = GuidancePlugin(magnitude="clip")
    assert (plugin.direction, plugin.max_angle, plugin.warmup_steps, plugin.log_every) == ("project", 30.0, 5, 2)
    assert isinstance(plugin.max_angle, float) and isinstance(plugin.warmup_steps, int)
    assert plugin.magnitude == "clip"


def test_keyword_wins_over_environment(clean_env):
    clean_env.setenv("SGG_MAX_ANGLE", "30")
    assert GuidancePlugin(max_angle=45).max_angle == 45.0


@pytest.mark.parametrize("var, value, message", [
    ("SGG_WARMUP_STEPS", "ten", "SGG_WARMUP_STEPS='ten' is not a valid int"),
    ("SGG_WARMUP_STEPS", "2.5", "SGG_WARMUP_STEPS='2.5' is not a valid int"),
    ("SGG_MAX_ANGLE", "wide", "SGG_MAX_ANGLE='wide' is not a valid float"),
    ("SGG_MAX_ANGLE", "120", "SGG_MAX_ANGLE='120': max_angle must be in (0, 90]"),
    ("SGG_DIRECTION", "sideways", "SGG_DIRECTION='sideways': direction must be one of"),
])
def test_bad_environment_value_names_the_variable(clean_env, var, value, message):
    clean_env.setenv(var, value)
    with pytest.raises(ValueError) as info:
        GuidancePlugin()
    assert message in str(info.value)


def test_bad_keyword_is_rejected(clean_env):
    with pytest.raises(ValueError, match="max_angle must be"):
        GuidancePlugin(max_angle=0)


# -- wrapping ---------------------------------------------------------------------------------
def test_wrap_plain_optimizer_equals_direct_construction(clean_env, twin_models):
    """The plugin's optimizer is the directly built one, and it really guides: its
    gradients are rewritten where its stats say so, and the parameters leave the
    unguided trajectory.

    Guards: apply_guidance_ not writing the gradients (EMA update kept).
    """
    a, b = twin_models
    plugin = GuidancePlugin(max_angle=20, warmup_steps=2)
    opt_a = plugin.wrap(torch.optim.SGD(a.parameters(), lr=0.1))
    opt_b = GuidedOptimizer(torch.optim.SGD(b.parameters(), lr=0.1), max_angle=20, warmup_steps=2)
    watch = GradientWatch(opt_a)
    train(a, opt_a, 8)
    train(b, opt_b, 8)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert opt_a.stats["projected"] > 0
    watch.assert_rewrote_where_reported(min_steps=3)
    unguided = tiny_mlp()
    train(unguided, torch.optim.SGD(unguided.parameters(), lr=0.1), 8)
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), unguided.parameters()))


def test_wrap_refuses_an_already_guided_optimizer(clean_env):
    opt = GuidedAdamW(tiny_mlp().parameters())
    with pytest.raises(TypeError, match="already guided"):
        GuidancePlugin().wrap(opt)


def test_wrap_refuses_deepspeed(clean_env):
    fake = SimpleNamespace(distributed_type=SimpleNamespace(value="DEEPSPEED"))
    with pytest.raises(NotImplementedError, match="DeepSpeed"):
        GuidancePlugin().wrap(torch.optim.SGD(tiny_mlp().parameters(), lr=0.1), accelerator=fake)


@pytest.mark.parametrize("version", [1, 2])
def test_wrap_refuses_accelerates_fsdp1_and_takes_fsdp2(clean_env, version):
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=version)  # its default is 1
    fake = SimpleNamespace(distributed_type=SimpleNamespace(value="FSDP"), state=SimpleNamespace(fsdp_plugin=plugin),
                           register_for_checkpointing=lambda obj: None, log=lambda *a, **k: None)
    base = torch.optim.SGD(tiny_mlp().parameters(), lr=0.1)
    if version == 1:
        with pytest.raises(NotImplementedError, match="fsdp_version: 2"):
            GuidancePlugin().wrap(base, accelerator=fake)
    else:
        assert isinstance(GuidancePlugin().wrap(base, accelerator=fake), GuidedOptimizer)


@pytest.mark.parametrize("when", ["before", "after"])
def test_wrap_before_or_after_prepare(clean_env, accelerate_state, when):
    """Guards: apply_guidance_ not writing the gradients (EMA update kept)."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    accelerator = Accelerator(cpu=True)
    model = tiny_mlp()
    twin = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    plugin = GuidancePlugin(max_angle=20, warmup_steps=2)
    if when == "before":
        opt = plugin.wrap(opt)
    model, opt = accelerator.prepare(model, opt)
    if when == "after":
        assert plugin.wrap(opt) is opt
    assert isinstance(opt, AcceleratedOptimizer) and isinstance(opt.optimizer, GuidedOptimizer)
    watch = GradientWatch(find_guided(opt))
    train(model, opt, 6)
    direct = GuidedOptimizer(torch.optim.AdamW(twin.parameters(), lr=1e-2), max_angle=20, warmup_steps=2)
    train(twin, direct, 6)
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), twin.parameters()))
    assert find_guided(opt).stats["step"] == 6
    watch.assert_rewrote_where_reported(min_steps=2)  # guided through prepare(), not bypassed
    unguided = tiny_mlp()
    train(unguided, torch.optim.AdamW(unguided.parameters(), lr=1e-2), 6)
    assert any(not torch.equal(x, y) for x, y in zip(model.parameters(), unguided.parameters()))


def test_reference_file_from_environment(clean_env, tmp_path):
    from sgg_optim import capture_reference

    model = tiny_mlp()
    ref = capture_reference(model, range(2), loss_fn=lambda m, s: backward_loss(m, s))
    ref.save(tmp_path / "ref.safetensors")
    clean_env.setenv("SGG_REFERENCE", str(tmp_path / "ref.safetensors"))
    plugin = GuidancePlugin()
    with pytest.raises(ValueError, match="pass model="):
        plugin.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    opt = plugin.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    assert opt.reference_mode == "sources"


def backward_loss(model, step):
    from conftest import batch

    x, y = batch(step)
    return torch.nn.functional.cross_entropy(model(x), y)


# -- logging ------------------------------------------------------------------------------------
class RecordingAccelerator:
    distributed_type = None

    def __init__(self):
        self.logged = []

    def log(self, values, step=None):
        self.logged.append((step, dict(values)))


def test_stats_logged_every_log_every_steps(clean_env):
    model = tiny_mlp()
    accelerator = RecordingAccelerator()
    plugin = GuidancePlugin(log_every=3, warmup_steps=2, max_angle=20)
    opt = plugin.wrap(torch.optim.SGD(model.parameters(), lr=0.1), accelerator=accelerator)
    train(model, opt, 10)
    assert [step for step, _ in accelerator.logged] == [3, 6, 9]
    step, values = accelerator.logged[-1]
    assert values["guidance/step"] == 9.0
    assert {"guidance/cos", "guidance/grad_norm", "guidance/guided_norm", "guidance/scale",
            "guidance/projected", "guidance/skipped"} <= values.keys()
    assert all(isinstance(v, float) for v in values.values())


def test_flat_stats_indexes_per_source_lists():
    flat = flat_stats({"cos": float("nan"), "alignment": [0.5, -0.1], "weights": [1.0, 0.0]}, "g/")
    assert flat.keys() == {"g/cos", "g/alignment/0", "g/alignment/1", "g/weights/0", "g/weights/1"}
    assert math.isnan(flat["g/cos"]) and flat["g/alignment/1"] == -0.1


# -- Transformers Trainer ---------------------------------------------------------------------------
class ToyTokens(torch.utils.data.Dataset):
    """Label 1 when token 7 occurs in the sequence: learnable in a few dozen steps."""

    def __init__(self, n: int = 64, length: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(10, 50, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.ids[self.labels == 1, 3] = 7

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def test_trainer_with_guided_adamw_and_callback(clean_env, accelerate_state, tmp_path):
    """Guards: apply_guidance_ not writing the gradients (EMA update kept)."""
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    from sgg_optim.integrations.transformers import GuidanceCallback

    watch: list[GradientWatch] = []

    class WatchGuidance(TrainerCallback):
        """Puts a GradientWatch on the guided optimizer once train() has built it."""

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            watch.append(GradientWatch(find_guided(optimizer)))

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(config)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=12,
                             gradient_accumulation_steps=2,
                             logging_steps=4, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=ToyTokens(),
                      optimizer_cls_and_kwargs=(GuidedAdamW, {"lr": 5e-3, "warmup_steps": 4, "max_angle": 45}),
                      callbacks=[GuidanceCallback()])
    trainer.add_callback(WatchGuidance())
    trainer.train()
    guided = find_guided(trainer.optimizer)
    # Guidance rewrote the gradients the AdamW step used, where its stats say so.
    watch[0].assert_rewrote_where_reported(min_steps=5)
    assert isinstance(guided, GuidedAdamW) and guided.config.max_angle == 45
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) >= 4
    assert logs[-1]["loss"] < 0.7 * logs[0]["loss"], [e["loss"] for e in logs]
    for entry in logs:
        assert {"guidance/cos", "guidance/grad_norm", "guidance/scale", "guidance/step"} <= entry.keys()
        assert entry["guidance/step"] == entry["step"]
    # once per optimizer step, not per micro-batch (gradient accumulation 2)
    assert guided.stats["step"] == trainer.state.global_step == 12 * 64 // 16


def test_accelerate_fewshot_example_runs_tiny(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGG_")}
    env.update(SGG_LOG_EVERY="3", SGG_WARMUP_STEPS="2", OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, str(root / "examples" / "accelerate_fewshot.py"), "--tiny", "--steps", "6",
                           "--save-dir", str(tmp_path / "state")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step    3" in proc.stdout and "step    6" in proc.stdout
    assert "eval accuracy" in proc.stdout
    saved = torch.load(tmp_path / "state" / "optimizer.bin", weights_only=True)
    assert saved["guidance"]["accepted"] == 6


def test_replace_adamw_example_prints_both_optimizers_and_their_paired_difference():
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, str(root / "examples" / "replace_adamw.py"), "--seeds", "2",
                           "--steps", "20"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {m[0]: (float(m[1]), float(m[2]), float(m[3]))
            for m in re.findall(r"^\s*(\d+|mean)\s+([\d.]+)\s+([\d.]+)\s+([+-][\d.]+)", proc.stdout, re.M)}
    assert set(rows) == {"0", "1", "mean"}, proc.stdout
    for adamw, guided, diff in rows.values():  # the difference is guided minus AdamW, per seed and on the mean
        assert abs((guided - adamw) - diff) <= 0.15 + 1e-9  # three figures rounded to 0.1
    assert "last guided step: cos" in proc.stdout
