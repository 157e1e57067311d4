"""Few-shot tooling on top of the core: real models and data, the k-shot protocol, the CLI.

Layers, each one module: :mod:`.assets` (fetch and cache registry packages),
:mod:`.tasks` (labelled tasks with a fixed eval split), :mod:`.protocol` (k-shot
sampling, lr choice on validation, one cell), :mod:`.training` (the fine-tuning loop and
its per-step trace), :mod:`.strategies` (the compared rows), :mod:`.metrics`,
:mod:`.results` (resumable JSONL), :mod:`.plots` and :mod:`.cli` (``sgg-optim demo`` /
``sgg-optim bench``). The core library never imports this package.

Heavy imports (transformers, peft, matplotlib) happen inside the functions that need
them, so ``import sgg_optim.fewshot`` is cheap.
"""
