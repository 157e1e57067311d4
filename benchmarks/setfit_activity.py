"""Does guidance act inside SetFit? One (task, seed) cell of `setfit` and `setfit+cone-ema`
per learning rate, with how often the cone turned the body's gradient.

SetFit trains its body in its own loop (sentence-transformers' Trainer), so the grid's rows
hold no per-step trace for it; here a callback reads the guided optimizer's `stats` after
every step. Training is the grid's own `run_cell`: the accuracies equal the grid rows'.

    python benchmarks/setfit_activity.py --task vader-amazon --lrs 5e-5,2e-4 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from sgg_optim import GuidedOptimizer  # noqa: E402
from sgg_optim.fewshot import strategies, tasks  # noqa: E402
from sgg_optim.fewshot.grid import model_factory  # noqa: E402
from sgg_optim.fewshot.protocol import run_cell  # noqa: E402
from sgg_optim.fewshot.training import RunConfig  # noqa: E402


class Recorder(TrainerCallback):
    """(projected, cos) of every guided step; nothing for an unguided optimizer."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, float]] = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        while optimizer is not None and not isinstance(optimizer, GuidedOptimizer):
            optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is not None:
            self.steps.append((float(optimizer.stats["projected"]), float(optimizer.stats["cos"])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="vader-amazon")
    ap.add_argument("--lrs", default="5e-5,2e-4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import setfit.trainer

    recorder = Recorder()
    train = setfit.trainer.Trainer.train

    def recorded_train(self, *args, **kwargs):  # the body's Trainer exists only inside SetFit's
        self.st_trainer.add_callback(recorder)
        return train(self, *args, **kwargs)

    setfit.trainer.Trainer.train = recorded_train
    task, factory = tasks.load_task(a.task), model_factory("minilm")
    for lr in (float(x) for x in a.lrs.split(",")):
        for name in ("setfit", "setfit+cone-ema"):
            recorder.steps.clear()
            row = run_cell(task, strategies.get_strategy(name), 16, a.seed, factory, RunConfig(), lr=lr)
            cos = sorted(c for _, c in recorder.steps if not math.isnan(c))
            print(json.dumps({"task": a.task, "seed": a.seed, "lr": lr, "row": name, "accuracy": row["accuracy"],
                              "val_acc": row["val_acc"], "guided_steps": len(recorder.steps),
                              "cone_acted": int(sum(p for p, _ in recorder.steps)),
                              "median_cos": round(cos[len(cos) // 2], 3) if cos else None,
                              "seconds": round(row["seconds"])}), flush=True)


if __name__ == "__main__":
    main()
