"""A complete training script with the catastrophe guard: the README's recipe.

    python docs/recipe.py

The part between the ``recipe`` markers is the README's first example, verbatim (a test checks
it). Compared with a plain PyTorch loop, three things change: the optimizer is wrapped by
``ss.stabilize``, the loss is computed per sample and passed through ``opt.clip`` (which
masks a NaN sample, remembers the raw mean for the guard, and clips with ``alrc=True``), and the
checkpoint holds ``opt.state_dict()``, which carries every component.
"""

import torch
import torch.nn.functional as F

import steadystep as ss

# --- recipe ---
torch.manual_seed(0)
x_all = torch.randn(2048, 20)
y_all = (x_all @ torch.randn(20, 4)).argmax(dim=1)  # a learnable 4-class task
data = torch.utils.data.TensorDataset(x_all, y_all)
loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)
model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))

# the guard around AdamW (alrc=True adds ALRC, cprop=True adds CProp: see docs/clean.md)
opt = ss.stabilize(torch.optim.AdamW(model.parameters(), lr=3e-3), model=model)
for epoch in range(3):
    for x, y in loader:
        per_sample = F.cross_entropy(model(x), y, reduction="none")
        loss = opt.clip(per_sample).mean()  # masks NaN samples, remembers the raw mean
        opt.zero_grad()
        loss.backward()
        opt.step()  # the guard watches the raw loss: skips a bad batch, rolls back a bad step
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, "checkpoint.pt")
# --- recipe ---

with torch.no_grad():
    accuracy = (model(x_all).argmax(dim=1) == y_all).float().mean()
stats = {key: float(value) for key, value in opt.stats().items()}
print(
    f"accuracy {float(accuracy):.3f}, alarms {stats['guard/alarms']:.0f}, "
    f"skipped {stats['guard/skips']:.0f}, LR scale {stats['guard/lr_scale']:.2f}"
)

# Resuming: build the same objects, load the checkpoint; training continues bitwise.
state = torch.load("checkpoint.pt", weights_only=True)
model.load_state_dict(state["model"])
opt.load_state_dict(state["opt"])
