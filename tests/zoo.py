"""Test models: torchvision architectures and a small CNN, with BatchNorm parameters randomized.

Random init leaves every γ at 1 (Torch-Pruning then silently prunes nothing, FINDINGS), so γ, β and the
running statistics are drawn at random to make importance rankings and parity checks meaningful.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

ARCHS = ["resnet18", "vgg11_bn", "mobilenet_v2", "densenet121", "efficientnet_b0", "shufflenet_v2_x0_5",
         "regnet_x_400mf"]
FORMATS = ["script", "trace", "pt2"]


class TwoConvNet(nn.Module):
    """conv-bn-relu ×2, then a 1×1 conv head: on 10×10 inputs the BN maps are 8×8 and 6×6; with no padding
    a constant channel is exactly constant (the unit tests of methods and pruning rules)."""

    def __init__(self, pad: int = 0) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(2, 8, 3, padding=pad, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=pad, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.head(x).mean((2, 3))


class SmallCNN(nn.Module):
    """A digits-sized CNN: conv-bn-relu blocks, a pool, a flatten and a linear head."""

    def __init__(self, in_ch: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 4 * 4, 64), nn.BatchNorm1d(64), nn.ReLU(),
                                  nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.05)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def make_model(name: str, num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if name == "smallcnn":
        model: nn.Module = SmallCNN(num_classes=num_classes)
    else:
        model = getattr(torchvision.models, name)(num_classes=num_classes)
    return randomize_bn(model, seed).eval()


def input_shape(name: str) -> tuple[int, ...]:
    return (1, 1, 8, 8) if name == "smallcnn" else (1, 3, 64, 64)


def save_model(model: nn.Module, fmt: str, path: Path, example: torch.Tensor) -> Path:
    """Write ``model`` as a user would upload it: scripted, traced or a torch.export program."""
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "script":
            torch.jit.save(torch.jit.script(model), str(path))
        elif fmt == "trace":
            torch.jit.save(torch.jit.trace(model, example), str(path))
        elif fmt == "pt2":
            batch = torch.export.Dim("batch", min=1, max=1024)
            ex = torch.cat([example, example]) if example.shape[0] == 1 else example
            ep = torch.export.export(model, (ex,), dynamic_shapes=({0: batch},))
            torch.export.save(ep, str(path))
        else:
            raise ValueError(fmt)
    return path


def digits_npz(path: Path, seed: int = 0) -> Path:
    """scikit-learn's digits (1,797 real 8×8 images) as the contract's .npz, with a fixed validation split."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[:, None]
    y = d.target.astype("int64")
    idx = np.random.default_rng(seed).permutation(len(x))
    tr, va = idx[:1400], idx[1400:]
    np.savez(path, x=x[tr], y=y[tr], x_val=x[va], y_val=y[va])
    return path


def trained_digits_cnn(npz: Path, epochs: int = 8, seed: int = 0) -> nn.Module:
    """A SmallCNN trained on digits to about 98-99% in a few seconds on CPU."""
    import numpy as np

    torch.manual_seed(seed)
    d = np.load(npz)
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * ((len(x) + 63) // 64))
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            if len(b) < 2:
                continue
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def prune_two_per_group(gm: nn.Module, ex: torch.Tensor, unprunable: dict[str, str]) -> int:
    """Remove two channels from every group of four or more (as the planner could): a lifted graph must
    stay runnable and exportable. Our coupling analysis decides the groups (Torch-Pruning misreads splits,
    grouped convs and shuffles: tests/test_coupling.py cross-checks it where it is right)."""
    from slimcore.groups import build_groups
    from slimcore.prune import apply

    gs = build_groups(gm, ex, [], unprunable)
    remove = {g.gid: torch.tensor([0, 1]) for g in gs.groups if g.size >= 4}
    apply(gm, gs, remove, None)
    return len(remove)


SIGNAL_LENGTH = 128


def _waves(rng: Any, n: int) -> tuple[Any, Any]:
    """Classes 0-4: sines of five frequencies; 5-9: square waves of the same; random phase, noise σ 0.8."""
    import numpy as np

    y = rng.integers(0, 10, n)
    t = np.linspace(0, 1, SIGNAL_LENGTH)
    wave = np.sin(2 * np.pi * (2 + (y % 5) * 1.7)[:, None] * t[None] + rng.uniform(0, 2 * np.pi, n)[:, None])
    x = np.where((y >= 5)[:, None], np.sign(wave), wave) + 0.8 * rng.standard_normal((n, SIGNAL_LENGTH))
    return x[:, None, :].astype("float32"), y.astype("int64")


class SignalCNN(nn.Module):
    """A 1-D signal classifier: five Conv1d-BatchNorm-ReLU layers, two max-pools, a global mean, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        ch, layers = [1, 16, 32, 32, 64, 64], []
        for i in range(5):
            layers += [nn.Conv1d(ch[i], ch[i + 1], 5, padding=2, bias=False), nn.BatchNorm1d(ch[i + 1]), nn.ReLU()]
            if i % 2:
                layers.append(nn.MaxPool1d(2))
        self.features, self.head = nn.Sequential(*layers), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(-1))


def signal_npz(path: Path) -> Path:
    """A task none of the methods were tuned on (issue 11 was filed after one like it): 3,000 training and
    600 held-out noisy waveforms of 10 classes, shaped (N, 1, 128)."""
    import numpy as np

    rng = np.random.default_rng(1)
    x, y = _waves(rng, 3000)
    xv, yv = _waves(rng, 600)
    np.savez(path, x=x, y=y, x_val=xv, y_val=yv)
    return path


def trained_signal_cnn(npz: Path, epochs: int = 20) -> nn.Module:
    """:class:`SignalCNN` trained to ~0.99 on :func:`signal_npz` in a few seconds on CPU."""
    import numpy as np

    d = np.load(npz)
    xs, ys = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    torch.manual_seed(0)
    model = SignalCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xs))
        for i in range(0, len(xs), 64):
            b = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(xs[b]), ys[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
