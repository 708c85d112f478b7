"""The job spec (version 1): the one model behind validation, the CLI and the OpenAPI schema.

Torch-free on purpose: the API process validates specs without importing torch.
Unknown fields are rejected at every level (``extra="forbid"``), as the contract demands.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

METHOD_NAMES = ("l1", "group_lasso", "ista", "receding", "polarization")


def _has_bool(v: Any) -> bool:
    return isinstance(v, bool) or (isinstance(v, list) and any(_has_bool(x) for x in v))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        """JSON ``true`` is not the number 1, nor ``0`` false (pydantic's lax mode would take both): the schema
        says number, or boolean, and the service must answer as it says."""
        if "bool" in str(cls.model_fields[info.field_name or ""].annotation):
            if v is not None and not isinstance(v, (bool, dict, BaseModel)):  # (an object where one may stand)
                raise ValueError("must be true or false")
            return v
        if _has_bool(v):
            raise ValueError("a boolean is not a number here")
        return v


class MethodSpec(_Strict):
    """Sparsity method and its parameters.

    ``strength`` is λ (L1, group lasso, polarization), ρ (ISTA) or κ (receding). When left out, it is
    found from the data, because the papers' defaults were tuned for long CIFAR schedules. ``search``:
    ``"control"`` (no extra epochs) steers it within the one sparse-training run: it starts at the paper's
    value and is raised (growing regularization) so that the share of channels near zero within their
    layer follows a ramp to the wanted fraction by 70% of the run, backing off when validation accuracy
    drops (slimcore/control.py); ``"pilot"`` runs ``pilot_runs`` short pilot runs first
    (slimcore/strength.py; what a spec that sets ``pilot_runs`` without ``search`` gets); ``"auto"``, the
    default, is ``control`` for every method (no extra epochs; with the penalty on the channels that are to go
    only, l1, ISTA and receding kept 0.99–0.995 right after removing half the channels of the digits CNN;
    receding used the pilot by default until session 13, when its steered run started from an L1-equivalent
    κ and beat the pilot: bench/README.md); ``"none"`` (or
    ``pilot_runs: 0``, its older spelling) the paper's default is used. ``group``:
    for ``l1``, regularize each coupled channel group by the aggregate of its |γ| instead of each γ alone
    (the group-level form).
    """

    name: Literal["l1", "group_lasso", "ista", "receding", "polarization"] = "l1"
    # up to 1e6: receding's κ on a trained upload is steered to 10²–10⁴ (its push on large γ is ~10⁻⁵)
    strength: Annotated[float, Field(gt=0, le=1e6)] | None = None
    group: bool = False
    # polarization's t, receding's offset b, ISTA's rescaling α
    t: Annotated[float, Field(gt=0)] = 1.2
    offset: float = 0.0
    alpha: Annotated[float, Field(gt=0)] = 1.0
    search: Literal["auto", "pilot", "control", "none"] = Field(
        "auto", description="how the strength is found when none is given: control (steered within the one "
                            "sparse-training run), pilot (short pilot runs first), none (the paper's default) or "
                            "auto (control, for every method)")
    pilot_runs: Annotated[int, Field(ge=0, le=12)] = Field(
        5, description="with search 'pilot': short sparse-training runs that pick the strength (0: paper default)")

    def strength_search(self) -> str:
        """How this spec finds its strength: 'given', 'control', 'pilot' or 'none'."""
        if self.strength is not None:
            return "given"
        if "pilot_runs" in self.model_fields_set and "search" not in self.model_fields_set:
            # older specs: pilot_runs 0 meant "the paper's default", a count meant "run the pilot"
            return "none" if self.pilot_runs == 0 else "pilot"
        if self.pilot_runs == 0 and "pilot_runs" in self.model_fields_set and self.search in ("pilot", "auto"):
            return "none"
        if self.search == "auto":
            return "control"
        return self.search


class TrainSpec(_Strict):
    """One training phase. ``optimizer``: SGD with ``momentum`` (the papers') or AdamW (``momentum`` is then
    β1); ``label_smoothing`` applies to classification's cross-entropy."""

    epochs: Annotated[int, Field(ge=0, le=10_000)] = 10
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 64
    lr: Annotated[float, Field(gt=0, le=10)] = 0.01
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    optimizer: Literal["sgd", "adamw"] = "sgd"
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0


class DistillSpec(_Strict):
    """Knowledge distillation from the original model while fine-tuning a classifier (Hinton et al.):
    loss = CE(student, labels) + ``weight`` · T² · KL(softmax(teacher/T) ‖ softmax(student/T)), T =
    ``temperature``. The T² keeps the soft term's gradients on the scale of the hard one's."""

    temperature: Annotated[float, Field(gt=0, le=100)] = 4.0
    weight: Annotated[float, Field(ge=0, le=100)] = 1.0


class FinetuneSpec(TrainSpec):
    """Fine-tuning: fewer epochs and a tenth of the sparse phase's lr by default, whether the block is
    given or not. ``distill`` (classification): true (the default, with :class:`DistillSpec`'s T and
    weight), false, or an object with ``temperature`` and ``weight``."""

    epochs: Annotated[int, Field(ge=0, le=10_000)] = 5
    lr: Annotated[float, Field(gt=0, le=10)] = 0.001
    distill: bool | DistillSpec = True

    def distillation(self) -> DistillSpec | None:
        if self.distill is False:
            return None
        return DistillSpec() if self.distill is True else self.distill


class LatencySpec(_Strict):
    """Where a latency target (and ``round_to: "auto"``) is measured: the runtime the model will be served
    with. ``auto`` is the export format's own runtime (onnxruntime for ONNX, torch for TorchScript and
    .pt2); ``threads`` None means every core the worker has. CUDA and TensorRT need a GPU worker: asking
    for them on a CPU-only worker fails the job at its start, never falls back silently."""

    runtime: Literal["auto", "onnxruntime", "torch", "tensorrt"] = "auto"
    device: Literal["cpu", "cuda"] = "cpu"
    batch_size: Annotated[int, Field(ge=1, le=1024)] = 1
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None


class PruneSpec(_Strict):
    """How much to remove.

    ``channels``: fraction of prunable channels; ``flops``/``params``: fraction of the model's FLOPs or
    parameters; ``threshold``: remove channels whose importance (|γ|) is below ``amount``; ``latency``:
    fraction of the latency measured on ``latency``'s runtime (0.5: twice as fast). ``round_to``: keep
    each layer's channel count a multiple of this, or ``"auto"``: the multiple that runtime is measured
    to be fast at, per layer (a latency target always rounds so). ``recalibrate_bn`` (default on): after
    removal, every BatchNorm's running mean and variance are re-measured on up to 512 training samples in
    a forward pass without gradients (adaptive BatchNorm, EagleEye); measured on the digits CNN at 50% of
    channels it lifted accuracy right after pruning from 0.63 to 0.85 (ISTA) and 0.87 to 0.98 (L1).
    """

    # the rule of ``_fraction`` in the JSON Schema too, so the OpenAPI document says what is refused
    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": [
        {"properties": {"target": {"const": "threshold"}}, "required": ["target"]},
        {"properties": {"amount": {"exclusiveMinimum": 0, "exclusiveMaximum": 1}}}]})

    target: Literal["channels", "flops", "params", "threshold", "latency"] = "channels"
    amount: Annotated[float, Field(ge=0)] = 0.5
    min_channels: Annotated[int, Field(ge=1)] = 4
    round_to: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    latency: LatencySpec = Field(default_factory=LatencySpec)
    ignore: list[str] = Field(default_factory=list, description="module-name globs never pruned")
    recalibrate_bn: bool = Field(
        True, description="re-measure BatchNorm statistics on up to 512 training samples after removal (no "
                          "gradient step): the removed channels' variance is otherwise still in every later layer's "
                          "statistics")

    @model_validator(mode="after")
    def _fraction(self) -> PruneSpec:
        if self.target != "threshold" and not (0 < self.amount < 1):
            raise ValueError(f"prune.amount must be in (0, 1) for target {self.target!r}, got {self.amount}")
        if self.latency.runtime == "tensorrt" and self.latency.device != "cuda":
            raise ValueError("prune.latency.runtime 'tensorrt' runs on a GPU: set prune.latency.device to 'cuda'")
        return self

    def measures_latency(self) -> bool:
        """Whether the job times candidates on a runtime (a latency target, or rounding chosen by measuring)."""
        return self.target == "latency" or self.round_to == "auto"


Size = Annotated[int, Field(ge=1, le=65_536)]


class DataSpec(_Strict):
    """How samples are read and prepared. Images: decoded lazily, resized (shorter side to ``resize``, or
    straight to the model's H×W when ``resize`` is None, today's behaviour), center-cropped to ``crop``
    (default: the model's H×W) for evaluation; training adds ``augment`` — ``standard``:
    random-resized-crop + horizontal flip (the papers' CIFAR/ImageNet recipe), ``strong``: that plus
    TrivialAugment and random erasing. ``mean``/``std`` (per channel, on the 0–1 scale) normalise after
    that; None leaves pixels in 0–1. The defaults keep npz data exactly as uploaded (``augment`` applies to
    4-d npz images too when asked). ``workers``: loader processes per job (None: chosen from the cores,
    0 for data already in memory)."""

    resize: Size | None = None
    crop: Size | Annotated[list[Size], Field(min_length=2, max_length=2)] | None = None
    mean: Annotated[list[float], Field(min_length=1, max_length=4)] | None = None
    std: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1, max_length=4)] | None = None
    augment: Literal["none", "standard", "strong"] = "none"
    workers: Annotated[int, Field(ge=0, le=64)] | None = None

    @model_validator(mode="after")
    def _pairs(self) -> DataSpec:
        if (self.mean is None) != (self.std is None):
            raise ValueError("data.mean and data.std go together: give both or neither")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError("data.mean and data.std need one value per channel each")
        return self


class ExportSpec(_Strict):
    format: Literal["same", "torchscript", "pt2", "onnx"] = "same"


class JobSpec(_Strict):
    version: Literal[1] = 1
    input_shape: list[Annotated[int, Field(ge=1, le=65_536)]] | None = Field(
        default=None, json_schema_extra={"minItems": 2, "maxItems": 5},
        description="e.g. [1, 3, 32, 32]; required for TorchScript; batch is never pinned. A shape above "
                    "SLIM_MAX_INPUT_ELEMENTS elements fails the job (422) before anything is allocated",
    )
    input_shapes: list[Annotated[list[Annotated[int, Field(ge=1, le=65_536)]],
                                 WithJsonSchema({"type": "array", "minItems": 2, "maxItems": 5,
                                                 "items": {"type": "integer", "minimum": 1, "maximum": 65_536}})]] \
        | None = Field(
        default=None, min_length=1, max_length=64,
        description="one shape per model input, in forward order, for models with several inputs "
                    "(e.g. [[1, 3, 32, 32], [1, 1, 32, 32]]); instead of input_shape")
    task: Literal["classification", "distillation"] = Field(
        "classification", description="classification: labels and cross-entropy on the model's one (batch, "
                                      "classes) output; distillation: no labels, every output matches the "
                                      "original model's")
    method: MethodSpec = Field(default_factory=MethodSpec)
    sparse_training: TrainSpec = Field(default_factory=TrainSpec)
    prune: PruneSpec = Field(default_factory=PruneSpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    seed: int = 0

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and not (2 <= len(v) <= 5):
            raise ValueError("input_shape needs 2 to 5 dimensions, batch first, e.g. [1, 3, 32, 32]")
        return v

    @field_validator("input_shapes")
    @classmethod
    def _shapes(cls, v: list[list[int]] | None) -> list[list[int]] | None:
        for i, s in enumerate(v or []):
            if not (2 <= len(s) <= 5):
                raise ValueError(f"input_shapes[{i}] needs 2 to 5 dimensions, batch first, e.g. [1, 3, 32, 32]")
        if v and len({s[0] for s in v}) > 1:
            raise ValueError("input_shapes must share the batch size (dim 0)")
        return v

    @model_validator(mode="after")
    def _one_of(self) -> JobSpec:
        if self.input_shape is not None and self.input_shapes is not None:
            raise ValueError("give input_shape (one input) or input_shapes (several), not both")
        return self

    def shapes(self) -> tuple[tuple[int, ...], ...] | None:
        """Every input's shape, in forward order (one for ``input_shape``), or None when the spec has none."""
        if self.input_shapes is not None:
            return tuple(tuple(s) for s in self.input_shapes)
        return (tuple(self.input_shape),) if self.input_shape is not None else None


def format_validation_error(err: ValidationError) -> str:
    """One line naming the field at fault, for the CLI and problem+json details."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "spec"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    return "invalid spec: " + "; ".join(parts)


def parse_spec(data: str | bytes | dict[str, Any]) -> JobSpec:
    """Parse JSON text or a dict; raises SlimError with a one-line reason."""
    from .errors import SlimError

    try:
        if isinstance(data, dict):
            return JobSpec.model_validate(data)
        return JobSpec.model_validate_json(data)
    except ValidationError as err:
        raise SlimError(format_validation_error(err), kind="invalid-spec") from None
