"""Few-shot fine-tuning with Accelerate and guidance, in any launch mode.

The same script runs as one process, several processes (DDP), two nodes or FSDP2;
only the launch changes (configs in ``examples/configs/``). Guidance is configured by
``SGG_*`` environment variables through :class:`sgg_optim.accelerate.GuidancePlugin`,
so a launched run changes guidance with no code change, and its ``stats`` are logged
through ``accelerator.log`` every ``log_every`` optimizer steps.

Model and data (real, fetched once from the package registry and cached, see
``sgg_optim.fewshot.assets``): all-MiniLM-L6-v2 with a fresh classification head,
fine-tuned on K examples per class of a task from ``sgg_optim.fewshot.tasks``
(default ``vader-tweets``), evaluated on the task's fixed held-out set. With
``--reference source`` the guidance reference is the mean gradient of a source task
(``vader-movie``), captured before training. ``--tiny`` uses a tiny random BERT and
synthetic data instead (no download; seconds; for smoke tests).

    python examples/accelerate_fewshot.py                                    # 1 process
    accelerate launch --config_file examples/configs/multi_process.yaml examples/accelerate_fewshot.py
    SGG_DIRECTION=project SGG_WARMUP_STEPS=4 accelerate launch \\
        --config_file examples/configs/multi_process.yaml examples/accelerate_fewshot.py --grad-accum 2
    # two nodes: on each machine, with its own --machine_rank
    accelerate launch --config_file examples/configs/two_nodes.yaml --machine_rank 0 examples/accelerate_fewshot.py
    accelerate launch --config_file examples/configs/fsdp.yaml examples/accelerate_fewshot.py   # GPUs
"""

from __future__ import annotations

import argparse
import math
import os
import random
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device, set_seed

from sgg_optim import capture_reference
from sgg_optim.accelerate import GuidancePlugin, find_guided


def load_data(args: argparse.Namespace) -> tuple[Any, Any, list[str], list[int], list[str], list[int], list]:
    """(model factory, tokenizer, train texts, train labels, eval texts, eval labels, source batches)."""
    if args.tiny:
        return _tiny_data(args)
    from sgg_optim.fewshot import assets
    from sgg_optim.fewshot.protocol import sample_kshot
    from sgg_optim.fewshot.tasks import load_task
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = assets.fetch(assets.MINILM, quiet=False)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    task = load_task(args.task)
    shots = sample_kshot(task.train_labels, k=args.shots, seed=args.seed)
    train_x = [task.train_texts[i] for i in shots.train]
    train_y = [task.train_labels[i] for i in shots.train]
    source: list = []
    if args.reference == "source":
        src = load_task("vader-movie")
        picked = random.Random(0).sample(range(len(src.train_texts)), 8 * args.batch_size)
        source = [_encode(tokenizer, [src.train_texts[i] for i in picked[j:j + args.batch_size]],
                          [src.train_labels[i] for i in picked[j:j + args.batch_size]], args.max_length)
                  for j in range(0, len(picked), args.batch_size)]

    def build() -> torch.nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=task.num_labels)

    return build, tokenizer, train_x, train_y, list(task.eval_texts), list(task.eval_labels), source


def _tiny_data(args: argparse.Namespace):
    from transformers import BertConfig, BertForSequenceClassification

    class Words:  # a whitespace "tokenizer" over a fixed vocabulary
        vocab = ["[PAD]", "good", "great", "fine", "bad", "awful", "poor", "the", "movie", "was", "plot"]

        def __call__(self, texts, truncation=True, max_length=16, padding=True, return_tensors="pt"):
            ids = [[self.vocab.index(w) for w in t.split()][:max_length] for t in texts]
            width = max(len(i) for i in ids)
            ids = torch.tensor([i + [0] * (width - len(i)) for i in ids])
            return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    rng = random.Random(args.seed)

    def sample(n: int) -> tuple[list[str], list[int]]:
        ys = [rng.randrange(2) for _ in range(n)]
        words = (["good", "great", "fine"], ["bad", "awful", "poor"])
        xs = [f"the {rng.choice(['movie', 'plot'])} was {rng.choice(words[y])}" for y in ys]
        return xs, ys

    train_x, train_y = sample(2 * args.shots)
    eval_x, eval_y = sample(64)
    config = BertConfig(vocab_size=len(Words.vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    tokenizer = Words()
    src_x, src_y = sample(4 * args.batch_size)
    source = [_encode(tokenizer, src_x[j:j + args.batch_size], src_y[j:j + args.batch_size], args.max_length)
              for j in range(0, len(src_x), args.batch_size)] if args.reference == "source" else []
    return (lambda: BertForSequenceClassification(config)), tokenizer, train_x, train_y, eval_x, eval_y, source


def _encode(tokenizer: Any, texts: list[str], labels: list[int], max_length: int) -> dict[str, torch.Tensor]:
    enc = dict(tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt"))
    enc["labels"] = torch.tensor(labels)
    return enc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="vader-tweets")
    ap.add_argument("--shots", type=int, default=16, help="examples per class")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=16, help="per process, per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference", choices=["ema", "source"], default="ema")
    ap.add_argument("--log-with", default=None, help="an Accelerate tracker, e.g. tensorboard")
    ap.add_argument("--save-dir", default=None, help="accelerator.save_state here at the end")
    ap.add_argument("--tiny", action="store_true", help="tiny random BERT, synthetic data")
    ap.add_argument("--cpu", action="store_true", help="train on CPU even where a GPU is present")
    args = ap.parse_args()
    if args.tiny and args.lr == 5e-5:
        args.lr = 3e-3

    # Launched processes on a machine without GPUs must ask for CPU (gloo) explicitly,
    # else each one silently trains alone.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = args.cpu or (world > 1 and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=args.grad_accum, log_with=args.log_with,
                              project_dir=args.save_dir)
    if accelerator.num_processes != world:
        raise SystemExit(f"launched {world} processes but Accelerate sees {accelerator.num_processes}")
    set_seed(args.seed)
    plugin = GuidancePlugin()  # SGG_* variables, else the library defaults
    accelerator.init_trackers("accelerate_fewshot", config={**vars(args), **plugin.guidance_kwargs()})
    build, tokenizer, train_x, train_y, eval_x, eval_y, source = load_data(args)
    with accelerator.main_process_first():
        model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(list(zip(train_x, train_y)), batch_size=args.batch_size, shuffle=True,
                                         collate_fn=lambda rows: _encode(tokenizer, [r[0] for r in rows],
                                                                         [r[1] for r in rows], args.max_length))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    reference = None
    if args.reference == "source":
        model.eval()
        reference = capture_reference(model, [send_to_device(b, accelerator.device) for b in source],
                                      accelerator=accelerator)
        model.train()
    optimizer = plugin.wrap(optimizer, accelerator=accelerator, reference=reference)
    guided = find_guided(optimizer)

    model.train()
    step, epochs = 0, math.ceil(args.steps * args.grad_accum / max(len(loader), 1)) + 1
    for _ in range(epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                accelerator.log({"loss": loss.item()}, step=step)
                if step % plugin.log_every == 0 or step == args.steps:
                    s = guided.stats
                    accelerator.print(f"step {step:4d}  loss {loss.item():.4f}  cos {s.get('cos', float('nan')):.3f}"
                                      f"  scale {s.get('scale', float('nan')):.3f}  skipped {s['skipped']}")
            if step >= args.steps:
                break
        if step >= args.steps:
            break

    model.eval()
    correct = torch.zeros((), device=accelerator.device)
    with torch.no_grad():
        shard = list(range(accelerator.process_index, len(eval_x), accelerator.num_processes))
        for i in range(0, len(shard), 64):
            idx = shard[i:i + 64]
            batch = send_to_device(
                _encode(tokenizer, [eval_x[j] for j in idx], [eval_y[j] for j in idx], args.max_length),
                accelerator.device)
            correct += (model(**batch).logits.argmax(-1) == batch["labels"]).sum()
    accuracy = accelerator.reduce(correct, reduction="sum").item() / len(eval_x)
    accelerator.print(f"eval accuracy {accuracy:.3f} on {len(eval_x)} examples "
                      f"({accelerator.num_processes} process(es), guidance {plugin.direction}/{plugin.magnitude})")
    accelerator.log({"eval_accuracy": accuracy}, step=step)
    if args.save_dir:
        accelerator.save_state(args.save_dir)
    # Leave together: end_training() destroys the process group, and a rank that tears
    # gloo down while its peer is still finishing the last collective makes the peer's
    # connection thread abort (SIGABRT, "Connection closed by peer").
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
