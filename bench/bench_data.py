"""Data at size: the streaming loader's throughput against torchvision's ImageFolder + DataLoader, worker
memory for 1k/10k/100k images, and what ``data.augment`` buys after fine-tuning. Run it alone on the
machine (concurrent torch processes distort everything on 2 cores).

  .venv/bin/python bench/bench_data.py throughput [--images 20000] [--workers 1]
  .venv/bin/python bench/bench_data.py rss [--sizes 1000,10000,100000]
  .venv/bin/python bench/bench_data.py augment

throughput: one epoch of batches of 32×32 PNGs with the same transforms (random-resized-crop 25–100% +
flip → float) and the same workers, images/s of each and their ratio (goal ≥ 0.9). rss: in a fresh process
per size, register the folder, run the check pass, one training epoch and one evaluation pass; peak RSS of
the training process and of its largest loader worker (goal: growth < 200 MB from the smallest to the
largest). augment: 32×32 patches of scikit-learn's two sample photos, labelled by region (8 classes:
natural images whose label survives crops and flips), a CNN trained on 4,000 of them, then slim jobs
given only ``--train`` (240) patches, one with ``augment: none`` and one with ``standard``: accuracy
after fine-tuning on 2,000 held-out patches.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_images(root: Path, n: int, size: int = 32, classes: int = 10, seed: int = 0) -> Path:
    """``n`` small noisy PNGs in train/<class>/ (class = a colour tint), 10% more in val/."""
    rng = np.random.default_rng(seed)
    tints = rng.integers(0, 255, (classes, 3))
    for split, count in (("train", n), ("val", max(classes, n // 10))):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            c = i % classes
            px = np.clip(rng.normal(tints[c], 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / split / f"c{c}" / f"{i:07d}.png", compress_level=1)
    return root


def throughput(args: argparse.Namespace) -> None:
    import torch
    import torchvision
    import torchvision.transforms.v2 as T
    from torch.utils.data import DataLoader

    from slimcore.data import load_dataset, make_loader
    from slimcore.spec import DataSpec

    os.environ["SLIM_DATA_IN_MEMORY_MB"] = "0"
    with tempfile.TemporaryDirectory() as tmp:
        root = make_images(Path(tmp) / "imgs", args.images)
        opts = DataSpec(augment="standard", workers=args.workers)
        ds = load_dataset(root, task="classification", input_shape=(1, 3, 32, 32), options=opts)
        tf = T.Compose([T.ToImage(), T.RandomResizedCrop((32, 32), scale=(0.25, 1.0), antialias=True),
                        T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True)])
        ref = torchvision.datasets.ImageFolder(str(root / "train"), transform=tf)

        def ours() -> int:
            loader = make_loader(ds.x_train, ds.y_train, args.batch, shuffle=True, seed=0)
            return sum(len(b[0]) for b in loader)

        def theirs() -> int:
            loader = DataLoader(ref, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                persistent_workers=args.workers > 0)
            return sum(len(b[0]) for b in loader)

        rows = {}
        for name, fn in (("slim", ours), ("torchvision", theirs)) * 2:  # alternate; keep the better of two
            t = time.perf_counter()
            n = fn()
            rate = n / (time.perf_counter() - t)
            rows[name] = max(rows.get(name, 0.0), rate)
        print(json.dumps({"images": args.images, "workers": args.workers, "batch": args.batch,
                          "images_per_s": {k: round(v) for k, v in rows.items()},
                          "ratio": round(rows["slim"] / rows["torchvision"], 3)}))


def _rss_child(root: str) -> None:
    """One size, measured in this fresh process."""
    from slimcore import io
    from slimcore.data import load_dataset, make_loader
    from slimcore.spec import DataSpec

    t = time.perf_counter()
    ds = load_dataset(Path(root), task="classification", input_shape=(1, 3, 32, 32),
                      options=DataSpec(augment="standard"))
    checked = time.perf_counter() - t
    seen = sum(len(b[0]) for b in make_loader(ds.x_train, ds.y_train, 128, shuffle=True, seed=0))
    seen += sum(len(b) for b in io.batches(ds.x_val, 256))
    print(json.dumps({"samples": seen, "source": ds.source, "check_s": round(checked, 1),
                      "main_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "worker_peak_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}))


def rss(args: argparse.Namespace) -> None:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(s) for s in args.sizes.split(",")]:
            root = make_images(Path(tmp) / f"n{n}", n)
            env = {**os.environ, "SLIM_DATA_IN_MEMORY_MB": "0"}
            out = subprocess.run([sys.executable, __file__, "_rss_child", str(root)], env=env, text=True,
                                 capture_output=True, check=True)
            row = {"images": n, **json.loads(out.stdout.strip().splitlines()[-1])}
            results.append(row)
            print(json.dumps(row), flush=True)
    grow = results[-1]["main_peak_mb"] - results[0]["main_peak_mb"]
    grow_w = results[-1]["worker_peak_mb"] - results[0]["worker_peak_mb"]
    print(json.dumps({"growth_main_mb": grow, "growth_worker_mb": grow_w}))


def augment(args: argparse.Namespace) -> None:
    import torch
    from torch import nn

    from slimcore.pipeline import run_job
    from slimcore.spec import parse_spec
    from tests.zoo import SmallCNN, save_model

    rng = np.random.default_rng(0)

    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in load_sample_images().images]

    def patches(n: int) -> tuple[np.ndarray, np.ndarray]:
        """Which of 8 regions (2 photos × 4 quadrants, scikit-learn's sample images) a 32×32 patch comes from,
        cut at a random place and scale: natural images whose label survives crops and flips."""
        x = np.empty((n, 3, 32, 32), np.float32)
        y = rng.integers(0, 8, n)
        for i in range(n):
            photo = photos[y[i] // 4]
            q = y[i] % 4
            h, w = photo.shape[1] // 2, photo.shape[2] // 2
            side = int(rng.integers(32, 97))
            top = q // 2 * h + int(rng.integers(0, h - side))
            left = q % 2 * w + int(rng.integers(0, w - side))
            crop = photo[:, top:top + side, left:left + side][None]
            x[i] = torch.nn.functional.interpolate(crop, size=(32, 32), mode="bilinear", antialias=True)[0].numpy()
        return x, y

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        x, y = patches(args.train)  # the job's few training images
        xv, yv = patches(2000)
        np.savez(d / "shapes.npz", x=x, y=y, x_val=xv, y_val=yv)
        torch.manual_seed(0)
        model = SmallCNN(3, 8, 16)
        model.features.append(nn.AdaptiveAvgPool2d(4))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        xb, yb = patches(4000)  # the original was trained on more data than the slimming job gets
        xt, yt = torch.from_numpy(xb), torch.from_numpy(yb)
        for _ in range(15):
            for i in range(0, len(xt), 64):
                opt.zero_grad()
                nn.functional.cross_entropy(model(xt[i:i + 64]), yt[i:i + 64]).backward()
                opt.step()
        path = save_model(model.eval(), "pt2", d / "m.pt2", torch.zeros(1, 3, 32, 32))
        rows = {}
        for kind in ("none", "standard"):
            spec = parse_spec(json.dumps({
                "input_shape": [1, 3, 32, 32], "method": {"name": "l1", "strength": 1e-3},
                "sparse_training": {"epochs": args.epochs, "batch_size": 64, "lr": 0.02},
                "prune": {"target": "channels", "amount": 0.5},
                "finetune": {"epochs": args.epochs, "batch_size": 64, "lr": 0.005},
                "data": {"augment": kind}}))
            t = time.perf_counter()
            report = run_job(path, spec, d / "shapes.npz", d / f"out-{kind}.pt2")
            st = report["stages"]
            rows[kind] = {"baseline": round(st["baseline"]["accuracy"], 4),
                          "pruned": round(st["pruned"]["accuracy"], 4),
                          "finetuned": round(st["finetuned"]["accuracy"], 4),
                          "wall_s": round(time.perf_counter() - t, 1)}
            print(json.dumps({"augment": kind, **rows[kind]}), flush=True)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_rss_child":
        _rss_child(sys.argv[2])
        return
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--images", type=int, default=20000)
    t.add_argument("--workers", type=int, default=1)
    t.add_argument("--batch", type=int, default=128)
    r = sub.add_parser("rss")
    r.add_argument("--sizes", default="1000,10000,100000")
    a = sub.add_parser("augment")
    a.add_argument("--train", type=int, default=240)
    a.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    {"throughput": throughput, "rss": rss, "augment": augment}[args.cmd](args)


if __name__ == "__main__":
    main()
