"""The job as stages (slimcore/stages): the ordered registry, the one resume rule, and a stage added in one
place (this file) that runs inside ``run_job`` and is skipped, its outputs restored, when the job resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from slimcore.checkpoint import FileCheckpoints
from slimcore.errors import JobCanceled
from slimcore.pipeline import run_job
from slimcore.spec import parse_spec
from slimcore.stages import STAGES, JobState, Resume, Stage, run_stages, usable_checkpoint
from slimcore.stages.state import StageRegistry
from tests.zoo import save_model

QUICK = {"input_shape": [1, 1, 8, 8], "method": {"name": "l1", "strength": 3e-3},
         "sparse_training": {"epochs": 2, "lr": 0.02}, "prune": {"target": "channels", "amount": 0.4},
         "finetune": {"epochs": 3, "lr": 0.01}}


class Memory:
    """A checkpoint store in memory, written through the same serialisation as the real ones."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    def load(self) -> dict[str, Any] | None:
        return self.state

    def save(self, state: dict[str, Any]) -> None:
        from slimcore.checkpoint import dumps, loads

        self.state = loads(dumps(state))  # weights_only: what a stage keeps must survive it


def test_the_registry_keeps_run_order_and_places_plug_ins_by_anchor():
    reg = StageRegistry()
    for name in ("a", "b"):
        reg.register(name)(type(name, (Stage,), {}))
    reg.register("c", after="a")(type("c", (Stage,), {}))
    reg.register("d", before="a")(type("d", (Stage,), {}))
    assert reg.ordered() == ["d", "a", "c", "b"]
    assert [s.name for s in reg.build()] == ["d", "a", "c", "b"]
    with pytest.raises(ValueError, match="not registered"):
        reg.register("e", after="nope")
    with pytest.raises(ValueError, match="twice"):
        reg.register("a")(type("a2", (Stage,), {}))
    reg.unregister("c")
    assert reg.ordered() == ["d", "a", "b"]
    # the job's own stages, with the latency plug-in where its anchors put it
    assert STAGES.ordered() == ["import", "calibrate", "latency", "coupling", "pilot", "baseline", "sparse_training",
                                "prune", "finetuning", "latency_check", "export", "report"]


class Setup(Stage):
    """No outputs: runs again on every attempt."""

    name = "setup"

    def __init__(self) -> None:
        self.runs = 0

    def run(self, job: JobState, resume: Resume | None) -> None:
        self.runs += 1
        job.model = nn.Linear(2, 2)


class Finishes(Stage):
    """Keeps an output, a report stage and a warning."""

    name = "finishes"

    def __init__(self) -> None:
        self.runs, self.restored = 0, None

    def run(self, job: JobState, resume: Resume | None) -> None:
        self.runs += 1
        job.rb.stage("finishes", accuracy=0.5)
        job.rb.warn("a warning from finishes")
        job.early = {"value": torch.arange(3)}

    def outputs(self, job: JobState) -> dict[str, Any]:
        return {"value": job.early["value"]}

    def restore(self, job: JobState, outputs: dict[str, Any]) -> None:
        self.restored = outputs
        job.early = {"value": outputs["value"]}


class Trains(Stage):
    """Four 'epochs', a checkpoint after each; the first attempt stops after ``stop_after``."""

    name = "trains"

    def __init__(self, stop_after: int | None) -> None:
        self.stop_after, self.epochs, self.resumed_at = stop_after, [], None

    def run(self, job: JobState, resume: Resume | None) -> None:
        start = 0
        if resume is not None:
            self.resumed_at = resume.epoch
            job.model.load_state_dict(resume.model)
            start = resume.epoch
        for epoch in range(start + 1, 5):
            with torch.no_grad():
                job.model.weight.fill_(epoch)
            self.epochs.append(epoch)
            job.checkpoint(self.name, epoch, {"step": epoch}, {"mine": epoch})
            if epoch == self.stop_after:
                raise JobCanceled(self.name)


def test_the_resume_rule(tmp_path):
    """A finished stage with outputs is skipped and restored (with its report stage and warning); a stage with
    none runs again; the stage the checkpoint was taken in continues from its epoch."""
    store = Memory()

    def job() -> JobState:
        return JobState(tmp_path / "m", parse_spec({}), tmp_path / "d", tmp_path / "o", checkpoints=store)

    first = [Setup(), Finishes(), Trains(stop_after=2)]
    with pytest.raises(JobCanceled):
        run_stages(job(), first, None)
    ck, metrics = usable_checkpoint(store.load())
    assert ck is not None and metrics == {"resumed_from": "trains:2"}
    assert ck["phase"] == "trains" and ck["epoch"] == 2 and ck["extra"] == {"mine": 2}
    assert set(ck["done"]) == {"finishes"}  # setup keeps nothing
    assert ck["done"]["finishes"]["stages"] == {"finishes": {"accuracy": 0.5}}
    assert ck["done"]["finishes"]["warnings"] == ["a warning from finishes"]

    again = [Setup(), Finishes(), Trains(stop_after=None)]
    resumed = job()
    run_stages(resumed, again, ck)
    setup, finishes, trains = again
    assert setup.runs == 1 and finishes.runs == 0
    assert torch.equal(finishes.restored["value"], torch.arange(3))
    assert resumed.rb.stages == {"finishes": {"accuracy": 0.5}} and resumed.rb.warnings == ["a warning from finishes"]
    assert trains.resumed_at == 2 and trains.epochs == [3, 4]
    assert float(resumed.model.weight.detach()[0, 0]) == 4.0
    assert [f.stage.name for f in resumed.finished] == ["setup", "finishes", "trains"]


def test_an_old_format_checkpoint_starts_over():
    old = {"phase": "finetuning", "epoch": 1, "model": {}, "pilot": {}, "stages": {}}
    ck, metrics = usable_checkpoint(old)
    assert ck is None and "older version" in metrics["restarted"]
    assert usable_checkpoint(None) == (None, {})


RUNS: list[str] = []


class Audit(Stage):
    """A stage added from one file: after pruning, it counts the pruned model's channels into the report."""

    def run(self, job: JobState, resume: Resume | None) -> None:
        RUNS.append("run")
        job.rb.extra["audit"] = {"bn_channels": sum(int(bn.num_features) for _, bn in job.bns)}

    def outputs(self, job: JobState) -> dict[str, Any]:
        return {"audit": job.rb.extra["audit"]}

    def restore(self, job: JobState, outputs: dict[str, Any]) -> None:
        RUNS.append("restore")
        job.rb.extra["audit"] = outputs["audit"]


@pytest.fixture
def audit_stage():
    RUNS.clear()
    STAGES.register("audit", after="prune")(Audit)
    yield
    STAGES.unregister("audit")


def _stopped_in_finetuning(model: Path, spec: Any, data: Path, tmp_path: Path) -> FileCheckpoints:
    """Run the job until fine-tuning has finished one epoch, then stop it, as a dying worker would."""
    store = FileCheckpoints(tmp_path / "ckpt")
    seen: list[tuple[str, float]] = []
    with pytest.raises(JobCanceled):
        run_job(model, spec, data, tmp_path / "out.pt2", checkpoints=store,
                progress=lambda ph, fr, m: seen.append((ph, m.get("epoch", 0.0))),
                should_stop=lambda: any(ph == "finetuning" and ep >= 1.0 for ph, ep in seen))
    return store


def test_a_stage_added_in_one_file_runs_and_resumes(tmp_path: Path, digits, digits_cnn, audit_stage):
    model = save_model(digits_cnn, "pt2", tmp_path / "m.pt2", torch.zeros(1, 1, 8, 8))
    spec = parse_spec(QUICK)
    store = _stopped_in_finetuning(model, spec, digits, tmp_path)
    assert RUNS == ["run"] and "audit" in store.load()["done"]
    report = run_job(model, spec, digits, tmp_path / "out.pt2", checkpoints=store)
    assert RUNS == ["run", "restore"]
    assert report["resumed_from"] == "finetuning:1"
    assert report["audit"]["bn_channels"] == sum(row["channels_after"] for row in report["layers"])
    assert report["stages"]["finetuned"]["params"] < report["stages"]["baseline"]["params"]


def test_a_latency_job_resumed_in_finetuning_keeps_its_plan_and_measurements(tmp_path, digits, digits_cnn,
                                                                              monkeypatch):
    """The timed plan is not redone on resume (a second one could differ from the checkpoint's structure): the
    removal is re-applied and the latency section (stage timings, the loop's tries, the table) comes back."""
    monkeypatch.setenv("SLIM_CACHE_DIR", str(tmp_path / "cache"))
    model = save_model(digits_cnn, "pt2", tmp_path / "m.pt2", torch.zeros(1, 1, 8, 8))
    spec = parse_spec({**QUICK, "sparse_training": {"epochs": 1}, "finetune": {"epochs": 2},
                       "prune": {"target": "latency", "amount": 0.3, "latency": {"runtime": "torch", "threads": 1}}})
    store = _stopped_in_finetuning(model, spec, digits, tmp_path)
    first = store.load()["done"]
    report = run_job(model, spec, digits, tmp_path / "out.pt2", checkpoints=store)
    lat = report["latency"]
    assert report["resumed_from"] == "finetuning:1"
    planned = first["prune"]["outputs"]["plan"]["remove"]
    assert report["removed_channels"] == sum(v.numel() for v in planned.values())
    assert set(lat["stages"]) == {"baseline", "pruned", "finetuned"}
    assert lat["iterations"] and lat["target"] and lat["alignment"] and {"table", "steps", "layers"} <= set(lat)
    assert lat["iterations"] == first["latency"]["outputs"]["measured"]["iterations"]
    assert report["stages"]["pruned"]["runtime_latency"] == first["prune"]["stages"]["pruned"]["runtime_latency"]
