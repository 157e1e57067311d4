"""Fine-tuning methods from the papers behind this project, each usable with plain AdamW or
with :class:`~sgg_optim.GuidedOptimizer`, and each a strategy row of the few-shot benchmark.

- :mod:`.sgg_exact`: Structured Gradient Guidance's exact objective (double backward).
- :mod:`.ltuning`: L-Tuning, label-derived soft prompt or prefix, label-embedding classifier.
- :mod:`.promot`: ProMoT, soft prompt first, then the model with the prompt attached and frozen.
- :mod:`.incontext`: label-word scoring for causal LMs and in-context-format fine-tuning.
- :mod:`.retention`: in-context retention of a tuned causal LM, and the in-context reference.

The submodules import transformers / peft lazily where they need them; import them by name.
"""
