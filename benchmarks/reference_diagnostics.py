"""Why does a source reference barely agree with few-shot target gradients?

At the initial point of a few-shot run (MiniLM with the seed's fresh head), measure the
cosine between gradient directions that guidance could use:

- ``batch vs batch``: two independent 16-example batches of the *target* task: the noise
  floor of one few-shot step's gradient;
- ``batch vs target mean``: one target batch against the target's mean gradient over 128
  examples (what a perfect same-task reference would give a single step);
- ``target mean vs source mean``: the target's and the source's mean gradients (128 each);
- ``batch vs source mean``: what ``cone-source`` sees at its first step;
- the same with class-balanced means (every 16-example batch 8 + 8): with a fresh head,
  an unbalanced batch's gradient is dominated by shifting the prior toward its majority
  class, a direction whose sign depends on the batch's class mix.

Each over all trainable parameters ("all"), the encoder only ("encoder") and the fresh
classification head only ("head"). Run:

    python benchmarks/reference_diagnostics.py --targets vader-amazon,vader-nyt,vader-tweets --seeds 3
"""

from __future__ import annotations

import argparse
import os
import random
import statistics

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def grads(model, tok, texts, labels, n, seed, balanced=False):
    rng = random.Random(seed)
    if balanced:  # n // C of every class
        classes = sorted(set(labels))
        idx = [i for c in classes for i in rng.sample([j for j, y in enumerate(labels) if y == c], n // len(classes))]
    else:
        idx = rng.sample(range(len(texts)), n)
    model.zero_grad(set_to_none=True)
    enc = tok([texts[i] for i in idx], truncation=True, max_length=64, padding=True, return_tensors="pt")
    out = model(**enc, labels=torch.tensor([labels[i] for i in idx]))
    out.loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def mean_grad(model, tok, texts, labels, batches, seed, balanced=False):
    acc = None
    for b in range(batches):
        g = grads(model, tok, texts, labels, 16, seed * 1000 + b, balanced)
        acc = g if acc is None else {k: acc[k] + g[k] for k in acc}
    return {k: v / batches for k, v in acc.items()}


def cos(a, b, part):
    keep = [k for k in a if (k.startswith("classifier") == (part == "head")) or part == "all"]
    x = torch.cat([a[k].reshape(-1) for k in keep]).double()
    y = torch.cat([b[k].reshape(-1) for k in keep]).double()
    return float(x @ y / (x.norm() * y.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="vader-amazon,vader-nyt,vader-tweets")
    ap.add_argument("--source", default="vader-movie")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from sgg_optim.fewshot import assets
    from sgg_optim.fewshot.protocol import sample_kshot
    from sgg_optim.fewshot.tasks import load_task
    from sgg_optim.fewshot.training import minilm_factory

    factory = minilm_factory(assets.fetch(assets.MINILM))
    src = load_task(args.source)
    rows: dict[tuple[str, str], list[float]] = {}
    for tname in args.targets.split(","):
        task = load_task(tname)
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model, tok = factory(task)
            model.eval()  # as capture_reference does: no dropout noise in the directions
            shots = sample_kshot(task.train_labels, 16, seed)
            kt = [task.train_texts[i] for i in shots.train]
            kl = [task.train_labels[i] for i in shots.train]
            b1 = grads(model, tok, kt, kl, 16, seed)
            b2 = grads(model, tok, kt, kl, 16, seed + 77)
            pool_t = mean_grad(model, tok, task.train_texts, task.train_labels, 8, seed)
            pool_s = mean_grad(model, tok, src.train_texts, src.train_labels, 8, seed)
            bal_t = mean_grad(model, tok, task.train_texts, task.train_labels, 8, seed, balanced=True)
            bal_s = mean_grad(model, tok, src.train_texts, src.train_labels, 8, seed, balanced=True)
            for part in ("all", "encoder", "head"):
                for name, a, b in (("batch vs batch (same 32 shots)", b1, b2), ("batch vs target mean", b1, pool_t),
                                   ("target mean vs source mean", pool_t, pool_s),
                                   ("batch vs source mean", b1, pool_s),
                                   ("batch vs balanced target mean", b1, bal_t),
                                   ("balanced target mean vs balanced source mean", bal_t, bal_s),
                                   ("batch vs balanced source mean", b1, bal_s)):
                    rows.setdefault((name, part), []).append(cos(a, b, part))
            print(f"{tname} seed {seed} done", flush=True)
    print("\n| pair | params | mean cos | min | max |\n|---|---|---|---|---|")
    for (name, part), v in rows.items():
        print(f"| {name} | {part} | {statistics.mean(v):.3f} | {min(v):.3f} | {max(v):.3f} |")


if __name__ == "__main__":
    main()
