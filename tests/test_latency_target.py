"""Latency as the target: ``prune.target: "latency"`` and ``round_to: "auto"`` through ``slim run`` with
files saved the way users save them, and the latency table on its own.

Timings here are checked with generous bounds only (CI machines are loaded); the figures are in
bench/README.md (``bench/bench_latency_target.py``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slimcore.errors import SlimError
from slimcore.groups import build_groups
from slimcore.latency.job import LatencyJob, check_faster
from slimcore.latency.planner import ITERATIONS
from slimcore.latency.runtime import Settings, open_runtime
from slimcore.latency.table import LatencyTable, _probe_module
from slimcore.spec import LatencySpec, PruneSpec, parse_spec
from tests.conftest import run_slim, write_spec
from tests.zoo import save_model

SIZE = 40


def _block(cin: int, c: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.Conv2d(c, cout, 1, bias=False), nn.BatchNorm2d(cout))


class InvertedResiduals(nn.Module):
    """Two MobileNetV2-style blocks: depthwise convs are where onnxruntime's fast path needs aligned counts."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.b1, self.b2 = _block(32, 192, 32), _block(32, 192, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.b2(x + self.b1(x))
        return self.head(x.mean((2, 3)))


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    m = InvertedResiduals()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):  # a trained network's spread of |γ|, so the ranking means something
            mod.weight.data = torch.rand(mod.num_features) + 0.05
    return m.eval()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SLIM_CACHE_DIR", str(cache))
    return cache


def _data(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((48, 3, SIZE, SIZE)).astype("float32"), y=rng.integers(0, 10, 48))
    return path


def _onnx(model: nn.Module, path: Path) -> Path:
    torch.onnx.export(model, (torch.randn(1, 3, SIZE, SIZE),), str(path), dynamo=False, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return path


def _run(tmp_path: Path, model_path: Path, prune: dict, name: str = "out") -> tuple[object, dict]:
    spec = write_spec(tmp_path / f"{name}.json", input_shape=[1, 3, SIZE, SIZE],
                      method={"name": "l1", "strength": 1e-4},
                      sparse_training={"epochs": 0}, finetune={"epochs": 1, "batch_size": 16}, prune=prune)
    out, rep = tmp_path / f"{name}{model_path.suffix}", tmp_path / f"{name}.report.json"
    r = run_slim("run", str(model_path), "--spec", str(spec), "--data", str(_data(tmp_path / "d.npz")),
                 "-o", str(out), "--report", str(rep), "--plots", str(tmp_path / f"{name}-plots"))
    return r, (json.loads(rep.read_text()) if rep.exists() else {})


def _ort_ratio(slim: Path, original: Path, tries: int = 3) -> float:
    """The two files timed in onnxruntime by the test itself (not the job's numbers): one thread without
    spinning, since the suite runs two test processes on two cores (a default session over both cores read
    0.92 in one CI run for a model the job had timed at 0.5), alternating blocks, the median of the per-block
    ratios. A loaded machine only ever makes one reading worse, so the best of a few tries is the reading."""
    import time

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    x = np.random.default_rng(1).standard_normal((1, 3, SIZE, SIZE)).astype("float32")
    sessions = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in (original, slim)]
    best = math.inf
    for _ in range(tries):
        ratios = []
        for _ in range(6):
            block = []
            for s in sessions:
                for _ in range(3):
                    s.run(None, {"x": x})
                ts = []
                for _ in range(15):
                    t0 = time.perf_counter()
                    s.run(None, {"x": x})
                    ts.append(time.perf_counter() - t0)
                block.append(float(np.median(ts)))
            ratios.append(block[1] / block[0])
        best = min(best, float(np.median(ratios)))
        if best < 0.85:
            break
    return best


def test_latency_target_on_an_onnx_upload_reaches_its_measured_ratio(tmp_path, model):
    """An ONNX file from torch.onnx.export (BN folded), target 0.5 on its own runtime (onnxruntime, the
    default): the job's closed loop reaches the ratio within 5%, and the written file, timed here
    independently, is faster by a margin that survives a loaded machine."""
    src = _onnx(model, tmp_path / "model.onnx")
    # one thread: the suite runs two test processes on two cores, and onnxruntime's spinning pool over both
    # cores timed the finished model 1.00x the original in one CI run (bench/ measures alone, every core)
    r, report = _run(tmp_path, src, {"target": "latency", "amount": 0.5, "latency": {"threads": 1}})
    assert r.returncode == 0, r.stderr[-2000:]
    lat = report["latency"]
    assert lat["runtime"] == "onnxruntime" and lat["batch_size"] == 1 and lat["threads"] >= 1
    assert lat["hardware"] and lat["runtime_version"].startswith("onnxruntime")
    its = lat["iterations"]
    assert 1 <= len(its) <= ITERATIONS + 1 and all({"aim", "predicted", "measured"} <= set(i) for i in its)
    got = lat["target"]["measured_ratio"]
    plans: dict[int, list[float]] = {}
    for it in its:
        plans.setdefault(it["removed_channels"], []).append(it["measured"])
    # the reported ratio is the mean of the kept plan's readings, two of them whenever more than one plan was
    # timed (one reading near the target is often one that noise flattered)
    kept = [v for v in plans.values() if abs(sum(v) / len(v) - got) <= 2e-4]
    assert kept and (len(plans) == 1 or len(kept[0]) >= 2), its
    # within the 5% tolerance, or said so: never a silent miss (generous: a loaded CI machine times noisily)
    assert lat["target"]["met"] == (got <= 0.5 * 1.05)
    assert lat["target"]["met"] or any("latency target not reached" in w for w in report["warnings"])
    assert got < 0.7, its
    for stage in ("baseline", "pruned", "finetuned"):
        st = lat["stages"][stage]
        assert 0 < st["median_ms"] <= st["p90_ms"]
    assert lat["stages"]["finetuned"]["ratio_to_baseline"] < 0.85
    assert report["target"] == {"kind": "latency", "requested": 0.5, "achieved": pytest.approx(
        1 - lat["target"]["measured_ratio"], abs=1e-4), "ranking": "global"}  # a given strength: global |γ|
    assert lat["table"]["probes_measured"] > 0 and lat["layers"], "the plot's curves are recorded"
    assert (tmp_path / "out-plots" / "latency.png").read_bytes().startswith(b"\x89PNG")
    assert _ort_ratio(tmp_path / "out.onnx", src) < 0.85


def test_latency_target_on_torchscript_times_torch_and_reuses_the_cache(tmp_path, model):
    """A traced TorchScript file: the natural runtime is torch. The second job on the same worker measures
    no probe again (the table is cached per runtime, threads, batch and hardware)."""
    src = save_model(model, "trace", tmp_path / "model.pt", torch.randn(1, 3, SIZE, SIZE))
    r, report = _run(tmp_path, src, {"target": "latency", "amount": 0.4, "latency": {"threads": 1}})
    assert r.returncode == 0, r.stderr[-2000:]
    lat = report["latency"]
    assert lat["runtime"] == "torch" and lat["threads"] == 1
    assert lat["table"]["probes_measured"] > 0
    r2, again = _run(tmp_path, src, {"target": "latency", "amount": 0.4, "latency": {"threads": 1}}, name="again")
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert again["latency"]["table"]["probes_measured"] == 0 and again["latency"]["table"]["probes_cached"] > 0


def test_round_to_auto_rounds_each_layer_to_its_measured_step(tmp_path, model):
    """``round_to: "auto"`` on a channels target: every pruned group keeps a multiple of its measured step."""
    src = _onnx(model, tmp_path / "model.onnx")
    r, report = _run(tmp_path, src, {"target": "channels", "amount": 0.45, "round_to": "auto", "min_channels": 1})
    assert r.returncode == 0, r.stderr[-2000:]
    steps = report["latency"]["steps"]
    assert steps and all(s in (1, 2, 4, 8, 16) for s in steps.values())
    assert not any("not multiples of 8" in w for w in report["warnings"])
    align = report["latency"]["alignment"]  # the whole-model check of the floor every layer keeps
    assert align["chosen"] in (1, 8, 16) and "1" in align["tried"]
    assert all(v > 0 for v in align["tried"].values())
    assert report["latency"]["stages"]["finetuned"]["ratio_to_baseline"] > 0


def test_round_to_auto_never_picks_a_slower_count(model):
    """Straight from the table: a group's kept count rounded up to its step is never slower (beyond noise),
    summed over the layers the group shrinks, than a larger count that is not aligned, on onnxruntime: the
    rounding lands on the runtime's fast points."""
    example = torch.randn(2, 3, SIZE, SIZE)
    gs = build_groups(model, example, [], None)
    rt = open_runtime(Settings("onnxruntime", "cpu", 1, 1))
    table = LatencyTable(model, gs, example, rt)
    table.probe_all(curves=False)
    checked = 0
    for gid, touches in table.touches.items():
        step, size = table.group_step(gid), table.groups[gid]
        whole = [t for t in touches if t.whole and table.sites[t.site].kind != "fixed"]
        if step == 1 or not whole:
            continue

        def total(c: int, whole: list = whole) -> float:
            return sum(table._at(table.sites[t.site], t.dim, c) for t in whole)

        def again(c: int, whole: list = whole) -> float:
            """Timed afresh, best of three: a noisy machine can slow one probe (seen on the 2-vCPU development
            machine: 0.80 ms against 0.63 ms for the count above it)."""
            out = 0.0
            for t in whole:
                site = table.sites[t.site]
                cin, cout = ((c, c * (site.cout // site.cin)) if t.dim == "dw"
                             else (c, site.cout) if t.dim == "in" else (site.cin, c))
                out += min(rt.time_probe(*_probe_module(site, cin, cout, 1)).min_ms for _ in range(3))
            return out

        assert step <= max(1, size // 4)
        for c in (size // 2 - 1, size // 2 + 1):
            up = min(size, math.ceil(c / step) * step)
            for larger in sorted({up + 1, up + step // 2, up + step - 1}):
                if larger < size:
                    ok = total(up) <= 1.25 * total(larger) or again(up) <= 1.25 * again(larger)
                    assert ok, (gid, c, up, larger, step)
                    checked += 1
    assert checked or all(table.group_step(g) == 1 for g in table.touches)


def test_latency_table_is_monotone_where_the_runtime_is(model):
    """A dense conv's aligned curve grows with its channels (torch, one thread): the interpolation the
    planner spends its budget on is not upside down."""
    example = torch.randn(2, 3, SIZE, SIZE)
    gs = build_groups(model, example, [], None)
    table = LatencyTable(model, gs, example, open_runtime(Settings("torch", "cpu", 1, 1)))
    table.probe_all()
    site = max((s for s in table.sites.values() if s.kind == "conv"), key=lambda s: s.full_ms)
    for dim, pts in site.curves.items():
        ms = [p[1] for p in pts]
        assert all(a <= 1.3 * b for a, b in zip(ms, ms[1:], strict=False)), (site.name, dim, pts)
        assert ms[0] < ms[-1], (site.name, dim, pts)
    kept = {gid: size for gid, size in table.groups.items()}
    half = {gid: max(1, size // 2) for gid, size in table.groups.items()}
    assert table.predict(half) < table.predict(kept)


def test_cuda_or_tensorrt_on_a_cpu_worker_fails_before_training(tmp_path, model):
    """A GPU runtime asked of a CPU-only worker: one line, no traceback, no silent fallback; TensorRT on a
    CPU device is refused by the spec itself (a 422 at the door)."""
    if torch.cuda.is_available():
        pytest.skip("this worker has CUDA")
    src = _onnx(model, tmp_path / "model.onnx")
    r, _ = _run(tmp_path, src, {"target": "latency", "amount": 0.5, "latency": {"device": "cuda"}})
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("slim: error:") and "CUDA" in last and "Traceback" not in r.stderr
    assert "sparse_training" not in r.stderr, "it failed at the start, before any training"
    with pytest.raises(SlimError, match="tensorrt.*cuda"):
        parse_spec({"prune": {"target": "latency", "amount": 0.5, "latency": {"runtime": "tensorrt"}}})
    r, _ = _run(tmp_path, src, {"target": "latency", "amount": 0.5, "latency": {"runtime": "tensorrt",
                                                                                 "device": "cuda"}}, name="trt")
    assert r.returncode != 0 and "CUDA" in r.stderr and "Traceback" not in r.stderr


def test_a_model_not_faster_is_an_error_for_a_latency_target(model):
    """Never a success: the final timing not below the original's fails a latency job with the numbers,
    and is a warning for other targets."""
    job = LatencyJob(Settings("torch", "cpu", 1, 1), open_runtime(Settings("torch", "cpu", 1, 1)),
                     lambda m, p: p, torch.randn(2, 3, SIZE, SIZE))
    job.stages = {"baseline": {"median_ms": 1.0, "p90_ms": 1.1, "repeats": 20},
                  "finetuned": {"median_ms": 1.02, "p90_ms": 1.2, "repeats": 20, "ratio_to_baseline": 1.02}}
    assert "1.020x" in (check_faster(job, strict=False) or "")
    with pytest.raises(SlimError, match="not faster") as e:
        check_faster(job, strict=True)
    assert e.value.kind == "not-faster"
    job.stages["finetuned"]["ratio_to_baseline"] = 0.7
    assert check_faster(job, strict=True) is None


def test_spec_defaults_for_latency():
    spec = PruneSpec(target="latency", amount=0.3)
    assert spec.latency == LatencySpec() and spec.measures_latency()
    assert PruneSpec(round_to="auto").measures_latency() and not PruneSpec().measures_latency()
    with pytest.raises(SlimError):
        parse_spec({"prune": {"round_to": "fast"}})


def test_ratio_is_the_median_of_block_ratios_so_one_slow_phase_does_not_move_it():
    """Timed in alternating blocks, a slow phase of the machine that lands on one model's blocks skews those
    rounds' ratios; the median over rounds drops them where the pooled medians moved (no clock involved)."""
    from slimcore.latency.runtime import Timing, ratio

    base_blocks = [40.0, 40.0, 34.0, 34.0, 34.0]  # the machine sped up in round 3 for both
    this_blocks = [20.0, 26.0, 17.0, 17.0, 26.0]  # and slowed during this model's blocks in rounds 2 and 5
    base = Timing.of([b for b in base_blocks for _ in range(4)], tuple(base_blocks))
    this = Timing.of([t for t in this_blocks for _ in range(4)], tuple(this_blocks))
    assert ratio(base, this) == 0.5
    assert this.median_ms / base.median_ms == 20.0 / 34.0  # the pooled medians read 0.59
    assert ratio(Timing.of([10.0]), Timing.of([5.0])) == 0.5  # no blocks: the medians


def _fake_loop(noise: list[float]) -> tuple[int, dict[int, list[float]]]:
    """The closed loop against a runtime whose true ratio is 1 − 0.9·k/100 (the prediction, 1 − k/100, is
    10% off), each reading off by the next entry of ``noise`` (0 once they run out)."""
    from slimcore.latency.planner import search

    queue = list(noise)

    def read(k: int, row: dict) -> float:
        return 1 - 0.9 * k / 100 + (queue.pop(0) if queue else 0.0)

    return search(0.5, 100, lambda aim: round(100 * (1 - aim)), read)


def test_the_loop_does_not_stop_on_one_flattered_reading():
    """The first plan (true ratio 0.55) reads 0.51 once, within 5% of 0.5: the loop times it again (0.59),
    judges it on the mean (0.55, a miss) and goes on to a plan that is within tolerance on two readings."""
    k, readings = _fake_loop([-0.04, +0.04])
    assert readings[50] == pytest.approx([0.51, 0.59])
    assert k != 50 and len(readings[k]) >= 2
    assert abs(sum(readings[k]) / len(readings[k]) - 0.5) <= 0.025


def test_a_plan_within_tolerance_is_read_twice_and_kept():
    k, readings = _fake_loop([])
    assert k == 55 and readings[55] == pytest.approx([0.505, 0.505])
    assert len(readings) == 2  # the first plan (0.55) missed, the corrected one hit twice: no confirmation
