"""Small conv-BN models with several inputs or structured outputs, shaped like the real ones users upload:
torchvision segmentation (``{"out", "aux"}``), ultralytics YOLO in eval (``(tensor, [tensor, ...])``), and a
two-input network. Each runs in milliseconds so the front-door tests stay seconds long.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Union  # noqa: UP035  (TorchScript reads these annotations)

import torch
from torch import nn

from tests.zoo import randomize_bn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SegNet(nn.Module):
    """Like torchvision's FCN/DeepLab/LRASPP: ``{"out": (N, 3, H, W), "aux": (N, 3, H, W)}``."""

    def __init__(self) -> None:
        super().__init__()
        self.b1, self.b2 = _block(3, 16), _block(16, 16)
        self.head, self.aux = nn.Conv2d(16, 3, 1), nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f1 = self.b1(x)
        f2 = self.b2(f1)
        return {"out": self.head(f2), "aux": self.aux(f1)}


class DetectNet(nn.Module):
    """Like YOLO in eval: ``(decoded (N, 7, A), [raw stride-1 map, raw stride-2 map])``."""

    def __init__(self) -> None:
        super().__init__()
        self.b1, self.b2 = _block(3, 16), _block(16, 16)
        self.down = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.p1, self.p2 = nn.Conv2d(16, 7, 1), nn.Conv2d(16, 7, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f = self.b2(self.b1(x))
        a, b = self.p1(f), self.p2(self.down(f))
        decoded = torch.cat([a.flatten(2), b.flatten(2)], 2).sigmoid()
        return decoded, [a, b]


class TwoInputNet(nn.Module):
    """An image and a second map (e.g. depth) fused: ``forward(image, depth) -> (N, classes)``."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.img, self.depth = _block(3, 16), _block(1, 8)
        self.fuse = _block(24, 16)
        self.fc = nn.Linear(16, classes)

    def forward(self, image: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        f = self.fuse(torch.cat([self.img(image), self.depth(depth)], 1))
        return self.fc(f.mean((2, 3)))


def make(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(cls(), seed).eval()


class RepeatNet(nn.Module):
    """Like ultralytics' seg head in its legacy ONNX export: one tensor listed twice among the outputs,
    ``(det, proto, (raw, proto))``."""

    def __init__(self) -> None:
        super().__init__()
        self.b1, self.b2 = _block(3, 16), _block(16, 16)
        self.det, self.proto = nn.Conv2d(16, 5, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        f = self.b2(self.b1(x))
        proto = self.proto(f)
        raw = self.det(f)
        return raw.flatten(2), proto, (raw, proto)


class LayerGetterNet(nn.Module):
    """Like torchvision's segmentation models under ``jit.script``: an ``OrderedDict`` filled in a loop over
    submodules (IntermediateLayerGetter), and ``F.interpolate(size=x.shape[-2:])`` (a list slice)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.ModuleDict({"low": _block(3, 16), "high": _block(16, 16)})
        self.head = nn.Conv2d(32, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats: dict[str, torch.Tensor] = OrderedDict()
        y = x
        for name, m in self.body.items():
            y = m(y)
            feats[name] = y
        out = self.head(torch.cat([feats["low"], feats["high"]], 1))
        out = nn.functional.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        result: dict[str, torch.Tensor] = OrderedDict()
        result["out"] = out
        return result


class ListJoinNet(nn.Module):
    """Like timm's DLA under ``jit.script``: ``torch.cat([x] + children, 1)``, a list joined with ``+``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _block(3, 16), _block(16, 16)
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        children = [self.b(a)]
        return self.head(torch.cat([a] + children, 1)).mean((2, 3))


class IsInstanceNet(nn.Module):
    """Like timm's DenseNet layers under ``jit.script``: ``isinstance(x, torch.Tensor)`` on a
    ``Union[Tensor, List[Tensor]]`` argument, decided by what the caller passes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _block(3, 16), _block(16, 16)
        self.head = nn.Conv2d(32, 4, 1)

    def joined(self, x: Union[torch.Tensor, List[torch.Tensor]]) -> torch.Tensor:  # noqa: UP006, UP007
        if isinstance(x, torch.Tensor):
            prev = [x]
        else:
            prev = x
        return torch.cat(prev, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        return self.head(self.joined([a, self.b(a)])).mean((2, 3))
