"""A plain PyTorch training loop where the only change from torch.optim.AdamW is the import.

Synthetic 4-class classification (fixed seed) with a small MLP. Every LOG_EVERY steps
the script prints the mean loss since the last print and the last step's guidance
figures, ``opt.stats``.

    python examples/replace_adamw.py
"""

import torch
from torch import nn

# from torch.optim import AdamW  # the original line
from sgg_optim import GuidedAdamW as AdamW  # the only change

STEPS, BATCH, LOG_EVERY = 200, 64, 20

torch.manual_seed(0)

# Synthetic data: labels from a random linear teacher, plus 10% flipped labels so the
# gradients are noisy enough for guidance to have something to do.
n, dim, classes = 4096, 32, 4
x = torch.randn(n, dim)
y = (x @ torch.randn(dim, classes)).argmax(dim=1)
flip = torch.rand(n) < 0.1
y[flip] = torch.randint(0, classes, (int(flip.sum()),))

model = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, classes))
opt = AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
loss_fn = nn.CrossEntropyLoss()

model.train()
window = 0.0
for step in range(1, STEPS + 1):
    idx = torch.randint(0, n, (BATCH,))
    loss = loss_fn(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    window += loss.item()

    if step % LOG_EVERY == 0:
        s = opt.stats  # the last step's figures; only step and skipped if that step was skipped
        figures = "  ".join(f"{k} {s[k]:.4f}" for k in ("cos", "grad_norm", "guided_norm", "scale", "projected")
                            if k in s)
        print(f"step {step:4d}  loss {window / LOG_EVERY:.4f}  {figures}  skipped {s['skipped']}")
        window = 0.0

with torch.no_grad():
    accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
print(f"train accuracy {accuracy:.3f}  (labels are 10% noise, so about 0.9 is the ceiling)")
