"""Memory and time of guidance over bitsandbytes' 8-bit optimizers and QLoRA.

Sections (``--section``, default all but ``qlora``, which takes minutes on CPU):

state    bytes of guidance state per guided parameter, EMA reference stored as
         fp32 / bf16 / int8, measured from ``state_dict()["guidance"]`` (every tensor
         the guidance keeps), beside the bytes of bnb's own 8-bit AdamW state.
         Target: int8 <= 1.05 B/param including absmax.
cosine   |cos(g, r_int8) - cos(g, r_fp32)| (and bf16) over many random and real
         (tiny Llama) gradients: the bound documented in docs/quantized.md.
time     the optimizer step alone over the LoRA adapters of the Llama-shaped 1B model
         (r=16, all linear layers): paged AdamW8bit vs guided paged AdamW8bit,
         alternating runs, medians. Target: guided adds <= 15%.
qlora    peak memory of one guided QLoRA training step of a Llama-shaped ~1B model
         (random weights, 4-bit NF4, LoRA r=16 on all linear layers, gradient
         checkpointing, guided paged AdamW8bit): ``torch.cuda.max_memory_allocated``
         with ``--device cuda`` (optionally capped with
         ``torch.cuda.set_per_process_memory_fraction``, ``--cap-gb``), peak RSS on CPU.
         Target: <= 8 GB on the GPU.

    python benchmarks/memory.py                                   # state, cosine, time
    python benchmarks/memory.py --section qlora --batch 1 --seq 128   # CPU-sized step
    python benchmarks/memory.py --section qlora --device cuda --cap-gb 8   # GPU: 4 x 512
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgg_optim import GuidedOptimizer, GuidedPagedAdamW8bit
from sgg_optim.functional import block_stats
from sgg_optim.integrations.bitsandbytes import keep_4bit_layout_for_training
from sgg_optim.storage import make_store

warnings.filterwarnings("ignore", message="Paged optimizers are not supported")

# Llama-shaped ~1B models (random weights; only the shapes matter here).
SHAPES = {
    # TinyLlama-1.1B: Llama-2 architecture, 22 layers, vocabulary 32000.
    "tinyllama-1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
                       "tie_word_embeddings": False},
    # Llama-3.2-1B: 16 layers, vocabulary 128256, tied embeddings.
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": True},
    # SmolLM2-135M, the examples' model.
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "tie_word_embeddings": True},
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GUIDANCE = {"direction": "cone", "max_angle": 60, "magnitude": "adaptive", "warmup_steps": 1}


def machine() -> dict[str, Any]:
    import bitsandbytes
    import transformers

    cpu = platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def lora_shapes(shape: str, rank: int) -> list[tuple[int, int]]:
    """(rows, cols) of every LoRA A and B matrix of the model, in model order."""
    cfg = SHAPES[shape]
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    out = []
    for _ in range(cfg["num_hidden_layers"]):
        for t in LORA_TARGETS:
            fan_in, fan_out = dims[t]
            out += [(rank, fan_in), (fan_out, rank)]
    return out


def adapter_params(shapes: list[tuple[int, int]], device: str, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, device=device) * 0.01) for s in shapes]


def fill_grads(params: list[torch.nn.Parameter], step: int) -> None:
    g = torch.Generator(device=params[0].device).manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=p.device) * 1e-3


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# -- (a) bytes of state per parameter -------------------------------------------------------------
def section_state(args: argparse.Namespace) -> dict[str, Any]:
    shapes = lora_shapes(args.shape, args.rank)
    numel = sum(a * b for a, b in shapes)
    out: dict[str, Any] = {"what": f"LoRA r={args.rank} adapters of {args.shape}", "params": numel,
                           "tensors": len(shapes)}
    for storage in ("fp32", "bf16", "int8"):
        params = adapter_params(shapes, "cpu")
        opt = GuidedPagedAdamW8bit(params, lr=1e-4, reference_dtype=storage, **GUIDANCE)
        for step in range(2):
            fill_grads(params, step)
            opt.step()
        sd = opt.state_dict()
        guidance = tensor_bytes(sd["guidance"])
        refs = tensor_bytes(sd["guidance"]["refs"])
        base = tensor_bytes([opt.state[p] for p in params])
        out[storage] = {"guidance_B_per_param": guidance / numel, "reference_B_per_param": refs / numel,
                        "bnb_adamw8bit_state_B_per_param": base / numel}
        print(f"  {storage}: guidance state {guidance / numel:.4f} B/param (reference {refs / numel:.4f}), "
              f"bnb AdamW8bit state {base / numel:.4f} B/param", flush=True)
    out["int8_target_met"] = out["int8"]["guidance_B_per_param"] <= 1.05
    out["nf4_weight"] = nf4_bytes_per_param(SHAPES[args.shape]["hidden_size"], SHAPES[args.shape]["intermediate_size"])
    return out


def nf4_bytes_per_param(rows: int, cols: int) -> dict[str, float]:
    """Bytes per weight of one NF4 ``Linear4bit`` layer (packed weight + quant state),
    with and without double quantisation of the absmax."""
    import bitsandbytes as bnb

    out = {}
    w = torch.randn(rows, cols, dtype=torch.bfloat16)
    for double in (True, False):
        p = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=double).to("cpu")
        qs = p.quant_state
        held = tensor_bytes(p.data) + tensor_bytes([qs.absmax, qs.code])
        if qs.nested:
            held += tensor_bytes([qs.state2.absmax, qs.state2.code, qs.offset])
        out["double_quant" if double else "plain"] = held / w.numel()
    print(f"  NF4 {rows}x{cols} weight: {out['double_quant']:.4f} B/param with double quantisation, "
          f"{out['plain']:.4f} without", flush=True)
    return out


# -- cosine error of low-precision references -------------------------------------------------
def _cos(grads: list[torch.Tensor], refs: list[torch.Tensor], storage: str) -> float:
    stores = [[make_store(r, storage)] for r in refs]
    st = block_stats(grads, stores, torch.zeros(len(grads), dtype=torch.long), 1)[0]
    return (st[1] / (st[0] * st[2]).sqrt()).item()


def cosine_cases(seeds: int) -> dict[str, list[tuple[list[torch.Tensor], list[torch.Tensor]]]]:
    """(gradients, references) pairs: ``random`` (4 tensors, g at a random cosine with r,
    r of scale 1e-3..1e3, every other seed heavy-tailed) and ``llama`` (gradients of a
    tiny Llama on two batches; r = one batch, the mean, or g itself)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cases: dict[str, list[tuple[list[torch.Tensor], list[torch.Tensor]]]] = {"random": [], "llama": []}
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        rho = torch.rand((), generator=g).item() * 2 - 1
        grads, refs = [], []
        for shape in [(64, 128), (128,), (300, 70), (5000,)]:
            r = torch.randn(shape, generator=g)
            if seed % 2:
                r = r * torch.randn(shape, generator=g).exp()
            grads.append(rho * r + math.sqrt(1 - rho ** 2) * torch.randn(shape, generator=g) * r.std())
            refs.append(r * 10 ** (torch.rand((), generator=g).item() * 6 - 3))
        cases["random"].append((grads, refs))
    for seed in range(max(seeds // 10, 2)):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64))
        batches = []
        for _ in range(2):
            model.zero_grad()
            ids = torch.randint(0, 256, (4, 32))
            model(input_ids=ids, labels=ids).loss.backward()
            batches.append([p.grad.clone() for p in model.parameters()])
        g1, g2 = batches
        mean = [(a + b) / 2 for a, b in zip(g1, g2)]
        cases["llama"] += [(g1, g2), (g1, mean), (g2, mean), (g1, g1)]
    return cases


def section_cosine(args: argparse.Namespace) -> dict[str, Any]:
    cases = cosine_cases(args.cos_seeds)
    out: dict[str, Any] = {}
    for kind, items in cases.items():
        errs: dict[str, list[float]] = {"int8": [], "bf16": []}
        cos = []
        for grads, refs in items:
            c32 = _cos(grads, refs, "fp32")
            cos.append(c32)
            for storage, e in errs.items():
                e.append(abs(_cos(grads, refs, storage) - c32))
        out[kind] = {"cases": len(items), "cos_range": [min(cos), max(cos)]}
        for storage, e in errs.items():
            e_sorted = sorted(e)
            out[kind][storage] = {"max": e_sorted[-1], "p99": e_sorted[int(0.99 * (len(e) - 1))],
                                  "median": statistics.median(e)}
        print(f"  {kind}: {len(items)} cases, cos in [{min(cos):+.3f}, {max(cos):+.3f}]; |dcos| int8 max "
              f"{out[kind]['int8']['max']:.2e} median {out[kind]['int8']['median']:.2e}; bf16 max "
              f"{out[kind]['bf16']['max']:.2e}", flush=True)
    return out


# -- (c) step time ------------------------------------------------------------------------------
def section_time(args: argparse.Namespace) -> dict[str, Any]:
    import bitsandbytes as bnb

    shapes = lora_shapes(args.shape, args.rank)
    device = args.device
    plain_params = adapter_params(shapes, device)
    plain = bnb.optim.PagedAdamW8bit(plain_params, lr=1e-4)
    guided = {s: GuidedOptimizer(bnb.optim.PagedAdamW8bit(adapter_params(shapes, device), lr=1e-4),
                                 reference_dtype=s, **GUIDANCE) for s in args.time_storages}
    runs: dict[str, list[float]] = {"plain": [], **{s: [] for s in guided}}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], step: int) -> float:
        fill_grads(params, step)
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        return time.perf_counter() - t0

    order = ["plain", *guided]
    for step in range(args.warmup + args.repeats):
        # Alternate which optimizer goes first, so drift in machine load hits all alike.
        for name in (order if step % 2 == 0 else order[::-1]):
            opt = plain if name == "plain" else guided[name]
            params = plain_params if name == "plain" else [p for g in opt.param_groups for p in g["params"]]
            t = timed(opt, params, step)
            if step >= args.warmup:
                runs[name].append(t)
    base = statistics.median(runs["plain"])
    out: dict[str, Any] = {"what": f"optimizer step over LoRA r={args.rank} adapters of {args.shape}",
                           "params": sum(a * b for a, b in shapes), "repeats": args.repeats,
                           "plain_median_s": base}
    print(f"  paged AdamW8bit step: median {base * 1e3:.1f} ms over {args.repeats} runs", flush=True)
    for s in guided:
        med = statistics.median(runs[s])
        out[s] = {"median_s": med, "ratio": med / base, "overhead_pct": 100 * (med / base - 1),
                  "target_met": med / base <= 1.15}
        print(f"  guided ({s} EMA reference): median {med * 1e3:.1f} ms, ratio {med / base:.3f} "
              f"(+{100 * (med / base - 1):.1f}%)", flush=True)
    return out


# -- (b) peak memory of one QLoRA step -----------------------------------------------------------
class PeakRSS:
    """Samples this process's resident set size in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:  # noqa: PYI034 - Self needs Python 3.11
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def build_qlora_model(args: argparse.Namespace, device: str, compute: torch.dtype) -> torch.nn.Module:
    """A Llama-shaped model with random weights, each linear layer quantised to NF4 as it
    is made (so building never holds the full-precision model), then LoRA adapters."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(args.seq, 2048))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    gen = torch.Generator(device=device).manual_seed(0)

    def replace(parent: torch.nn.Module, name: str, linear: torch.nn.Linear) -> None:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=compute,
                              quant_type="nf4", compress_statistics=True, device="meta")
        w = torch.randn(linear.out_features, linear.in_features, generator=gen, device=device, dtype=compute)
        q.weight = bnb.nn.Params4bit(w.mul_(0.02), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, module=q).to(device)
        setattr(parent, name, q)

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    replace(parent, name, child)
    # Embedding, norms and (untied) head stay in the compute dtype, frozen, as in QLoRA.
    # Only the parameters still on meta are made (Module.to_empty would also replace the
    # quantised weights with uninitialised memory).
    for name, p in list(model.named_parameters()):
        if p.device.type != "meta":
            continue
        owner, _, attr = name.rpartition(".")
        if name.endswith("norm.weight"):
            value = torch.ones(p.shape, device=device, dtype=compute)
        else:
            value = torch.randn(p.shape, generator=gen, device=device, dtype=compute).mul_(0.02)
        setattr(model.get_submodule(owner), attr, torch.nn.Parameter(value, requires_grad=False))
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)  # its buffers were on meta
    if config.tie_word_embeddings:
        model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(False)
    keep_4bit_layout_for_training(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def section_qlora(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    compute = torch.bfloat16 if args.compute == "bf16" else torch.float32
    cap = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        if args.cap_gb:
            total = torch.cuda.get_device_properties(0).total_memory
            cap = min(1.0, args.cap_gb * 2 ** 30 / total)
            torch.cuda.set_per_process_memory_fraction(cap)
    rss0 = _rss()
    t0 = time.perf_counter()
    model = build_qlora_model(args, device, compute)
    build_s = time.perf_counter() - t0
    n_total = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    adapters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_adapt = sum(p.numel() for _, p in adapters)
    opt = GuidedPagedAdamW8bit(adapters, lr=1e-4, reference_dtype=args.reference_dtype, **GUIDANCE)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0)).to(device)
    model_bytes = sum(tensor_bytes(p) for p in model.parameters()) + sum(tensor_bytes(b) for b in model.buffers())
    rss_before = _rss()
    print(f"  built {args.shape}: {n_total / 1e9:.3f}B parameters ({n_adapt / 1e6:.2f}M adapters in "
          f"{len(adapters)} tensors) in {build_s:.0f} s; model tensors {model_bytes / 2 ** 30:.2f} GiB", flush=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    steps = []
    with PeakRSS() as rss:
        for step in range(args.steps):
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if device == "cuda":
                torch.cuda.synchronize()
            steps.append(time.perf_counter() - t0)
            print(f"  step {step + 1}: loss {loss.item():.4f}, {steps[-1]:.1f} s", flush=True)
    out: dict[str, Any] = {
        "shape": args.shape, "params": n_total, "adapter_params": n_adapt, "batch": args.batch, "seq": args.seq,
        "rank": args.rank, "compute_dtype": args.compute, "reference_dtype": args.reference_dtype,
        "device": device, "build_s": build_s, "step_s": steps, "model_tensor_bytes": model_bytes,
        "rss_start_bytes": rss0, "rss_before_step_bytes": rss_before, "rss_peak_step_bytes": rss.peak,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "guidance_state_bytes": tensor_bytes(opt.state_dict()["guidance"]),
        "optimizer_state_bytes": tensor_bytes([opt.state[p] for _, p in adapters]),
    }
    print(f"  peak RSS during the step {rss.peak / 2 ** 30:.2f} GiB (before it {rss_before / 2 ** 30:.2f} GiB, "
          f"process max {out['ru_maxrss_bytes'] / 2 ** 30:.2f} GiB)", flush=True)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        out.update({"cuda_max_allocated_bytes": peak, "cuda_cap_fraction": cap,
                    "target_met": peak <= 8 * 2 ** 30})
        print(f"  torch.cuda.max_memory_allocated {peak / 2 ** 30:.2f} GiB (cap fraction {cap})", flush=True)
    return out


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", action="append", choices=["state", "cosine", "time", "qlora"])
    parser.add_argument("--shape", choices=list(SHAPES), default="tinyllama-1.1b")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--cos-seeds", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--time-storages", nargs="+", default=["fp32", "bf16", "int8"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--compute", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--reference-dtype", choices=["fp32", "bf16", "int8"], default="int8")
    parser.add_argument("--cap-gb", type=float, default=None, help="cuda: set_per_process_memory_fraction cap")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = args.section or ["state", "cosine", "time"]
    results: dict[str, Any] = {"machine": machine(), "argv": sys.argv[1:] if argv is None else argv,
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(results["machine"]), flush=True)
    runners = {"state": section_state, "cosine": section_cosine, "time": section_time, "qlora": section_qlora}
    for name in sections:
        print(f"[{name}]", flush=True)
        results[name] = runners[name](args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
