"""What verify returns: the figures per output and per fold, the verdict, and the JSON section (schema)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


#: Version of the ``verify`` section of the JSON report.
SCHEMA_VERSION = 4

#: A fold is within the floor when its deviation is at most this multiple of the twin's (worst input sets).
FLOOR_MULTIPLE = 4.0


@dataclass
class OutputCheck:
    """The comparison of one output at one optimisation level; every figure is that of the worst input set."""

    name: str
    shape: list[int]
    max_abs: float
    max_rel: float  # max |folded - original| / |original| over elements where original != 0
    range: float  # max - min of the original output
    of_range: float  # max_abs / range
    step: float | None  # quantization step (see quantization_steps); None when no quantizer feeds the output
    moved: int | None  # elements that moved by at least half a step
    elements: int
    passed: bool
    level: str = "off"
    floor_of_range: float | None = None  # the rounding twin's deviation, as a share of the range
    floor_moved: int | None = None
    snr_db: float | None = None  # 10 log10(sum original^2 / sum (folded - original)^2); inf when identical
    floor_snr_db: float | None = None
    verdict: str = "exact"  # exact / approximate / differs

    @property
    def moved_share(self) -> float | None:
        return None if self.moved is None else self.moved / max(self.elements, 1)


@dataclass
class FoldCertificate:
    """One folded BN checked where it sits: its folded layer(s) run on the original's activations."""

    node: str  # the BN
    into: list[str]
    compared: str  # the value compared (the original's BN output, or the layer's output for forward folds)
    max_abs: float
    ratio: float  # largest |folded - original| / bound over elements; <= 1 passes
    channel: int | None  # the channel where that ratio is
    bound_bias: float  # the reported int32 bias rounding included in the bound
    exact_fold: bool  # False: an approximate option allowed this fold, the figure says how far
    passed: bool


@dataclass
class VerifyResult:
    outputs: list[OutputCheck]  # optimisations off (the first level run), one per model output
    tolerance: float
    seed: int
    input_shapes: dict[str, list[int]]
    quantized_units_before: dict[str, int] = field(default_factory=dict)
    quantized_units_after: dict[str, int] = field(default_factory=dict)
    levels: dict[str, list[OutputCheck]] = field(default_factory=dict)  # every level run
    certificates: list[FoldCertificate] = field(default_factory=list)
    uncertified: list[str] = field(default_factory=list)  # folded BNs no certificate could isolate
    input_sets: int = 1
    input_source: str = "random"  # "random" or the files given
    symbolic_dims: dict[str, int] = field(default_factory=dict)
    floor_multiple: float = FLOOR_MULTIPLE
    units_level: str | None = None  # the onnxruntime level the quantized units were counted at
    extra_input_sets: dict[str, int] = field(default_factory=dict)  # per level: random sets added to decide
    #: Levels asked for that could not be checked: onnxruntime cannot build the original there (its own
    #: rewrites fail, e.g. ConvBnFusion making a weight over 2 GB). The level and onnxruntime's reason.
    skipped_levels: dict[str, str] = field(default_factory=dict)
    #: Set when the models were compared with TensorRT's trt:: quantizers rewritten as standard ops
    #: (qdqfold.trt_compat.standard_qdq): onnxruntime cannot run them as they are.
    rewritten: str | None = None
    #: Set when the folded model differed at a level only because of onnxruntime's integer kernels on this CPU
    #: (see _attribute_to_kernels): the level, the session option under which the fold is within the floor,
    #: the deployed figures per output, the integer layers measured one by one, and the option's cost.
    kernels: dict[str, Any] | None = None
    #: Set when the output was made with a deployment target (the fold report's ``target``): onnxruntime's
    #: integer kernels measured beside the report's prediction, the saturation check's coverage, the rewrites'
    #: verdict and, for an approximate rewrite, how far the outputs move against the QAT export (verify/target.py).
    target: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def verdict(self) -> str:
        checks = [o for outs in (self.levels.values() or [self.outputs]) for o in outs]
        if any(o.verdict == "differs" for o in checks) or any(not c.passed for c in self.certificates) or \
                (self.target is not None and self.target.get("problems")):
            return "differs"
        if any(o.verdict == "approximate" for o in checks) or any(not c.exact_fold for c in self.certificates) or \
                (self.target is not None and self.target.get("approximate")):
            return "approximate"
        # No certificate, no "exact": the outputs agree, but a fold no certificate isolated is not proven.
        return "uncertified" if self.uncertified else "exact"

    @property
    def passed(self) -> bool:
        return self.verdict != "differs"

    @property
    def kernel_warning(self) -> bool:
        """The fold is judged without them, but this CPU's integer kernels move the deployed outputs."""
        return self.kernels is not None and any(o["moved"] or o["of_range"] > 0 for o in self.kernels["outputs"])

    def kernel_message(self) -> str | None:
        """One line on what this CPU's integer kernels do to the folded model (None when nothing)."""
        if not self.kernel_warning:
            return None
        k = self.kernels
        worst = max(k["outputs"], key=lambda o: o["of_range"])
        layers = [lay["node"] for lay in k["layers"] if lay["moved"]]
        named = f" in {', '.join(layers[:6])}{' ...' if len(layers) > 6 else ''}" if layers else ""
        return (f"onnxruntime's integer kernels on this CPU move output {worst['name']!r} by {worst['of_range']:.3g} "
                f"of its range at level {k['level']} (the fold itself is exact: with {k['option']} it is within the "
                f"rounding floor); their 16-bit pair sums saturate{named}")

    @property
    def moved(self) -> int:
        """Elements that moved by a quantization step, over all quantized outputs."""
        return sum(o.moved or 0 for o in self.outputs)

    @property
    def worst_fold(self) -> FoldCertificate | None:
        return max(self.certificates, key=lambda c: c.ratio, default=None)

    def only_with_optimisations(self) -> bool:
        """A difference that shows only at an optimisation level other than off."""
        off = self.levels.get("off", self.outputs)
        return all(o.verdict != "differs" for o in off) and self.verdict == "differs" and \
            all(c.passed for c in self.certificates)

    def failure_message(self) -> str | None:
        """One line saying why the verdict is differs (None when it is not)."""
        if self.passed:
            return None
        bad = [c for c in self.certificates if not c.passed]
        if self.target is not None and self.target.get("problems") and not bad and \
                all(o.verdict != "differs" for outs in self.levels.values() for o in outs):
            return f"target {self.target['name']}: {self.target['problems'][0]}"
        if bad:
            c = max(bad, key=lambda c: c.ratio)
            return (f"fold of {c.node} into {', '.join(c.into)} is off by {c.max_abs:.3g} in channel {c.channel} "
                    f"({c.ratio:.3g} times its float-rounding bound)")
        level, worst = max(((lv, o) for lv, outs in self.levels.items() for o in outs if o.verdict == "differs"),
                           key=lambda p: p[1].of_range)
        where = " (only with onnxruntime's optimisations on)" if self.only_with_optimisations() else ""
        floor = "-" if worst.floor_of_range is None else f"{worst.floor_of_range:.3g}"
        return (f"output {worst.name!r} differs by {worst.max_abs:.3g} ({worst.of_range:.3g} of its range; rounding "
                f"floor {floor}) at optimisation level {level}{where}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for out, check in zip(data["outputs"], self.outputs):
            out["moved_share"] = check.moved_share
        data["passed"] = self.passed
        data["verdict"] = self.verdict
        worst = self.worst_fold
        data["worst_fold"] = None if worst is None else {"node": worst.node, "ratio": worst.ratio,
                                                         "max_abs": worst.max_abs, "channel": worst.channel}
        data["differs_only_with_optimisations"] = self.only_with_optimisations()
        data["kernel_warning"] = self.kernel_warning
        data["quantized_units"] = {"before": sum(self.quantized_units_before.values()),
                                   "after": sum(self.quantized_units_after.values())}
        return data


class VerifyError(ValueError):
    """A model cannot be run (e.g. onnxruntime rejects it, or an input type cannot be generated)."""
