"""One verification run: per optimisation level, the sessions, the input sets through them, the certificates,
the extra input sets before an output is called "differs", and the result. :func:`qdqfold.verify.verify` drives it.

One level at a time (the sessions of a level are dropped before the next level's are built, so at most four models
are in memory at once): the original (off: with the certified activations exposed), the fold, the twin, and at
level off the certificate model. Each is built once and runs every input set."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping, Sequence

from .attribution import _attribute_to_kernels
from .certificates import _certificate_model, _certify, _exposed_bytes, _plan_certificates
from .folds import _all_folded, _folded_entries
from .inputs import _index_limits, load_inputs, random_inputs, symbolic_sizes
from .judge import _judge, _figures
from .loading import LEVELS, _derived_session, _level, _Model, _run, _session
from .result import FoldCertificate, OutputCheck, VerifyError, VerifyResult
from .steps import _units_in, last_quantizer_steps, quantization_steps, quantized_units
from .twin import _ort_bias_rounding, _twin_bytes

#: Random input sets added, at most, before an output beyond the floor is called "differs" (see verify).
EXTRA_INPUT_SETS = 9


class _Run:
    """The state of one verification: what is compared, the input sets, and the figures gathered per level."""

    def __init__(self, base: _Model, fold: _Model, report: Any, levels: list[str], *, tolerance: float, seed: int,
                 symbolic_size: int | None, dims: dict[str, int] | None, count_units: bool,
                 inputs: Sequence[Any] | None, input_sets: int, twin: bool, certificates: bool):
        self.base, self.fold, self.report, self.levels = base, fold, report, levels
        self.tolerance, self.seed, self.symbolic_size, self.dims = tolerance, seed, symbolic_size, dims
        self.count_units, self.inputs, self.input_sets, self.twin = count_units, inputs, input_sets, twin
        self.entries = _folded_entries(report)
        self.approximate = any(e["exact"] is False for e in self.entries)
        self.proto = base.proto() if (self.entries or inputs is None) else None
        self.plans, self.skipped = ([], [])
        if certificates and self.entries:
            self.plans, self.skipped = _plan_certificates(self.proto, fold.proto(), report, base.folder)
        self.exposed_names = [p.x for p in self.plans] + [p.y for p in self.plans]
        self.steps = self.flips = {}
        if self.proto is not None and any(n.op_type == "QuantizeLinear" for n in self.proto.graph.node):
            self.steps, self.flips = quantization_steps(self.proto), last_quantizer_steps(self.proto)
        self.feed_sets: list[dict[str, Any]] = []
        self.sizes: dict[str, int] = {}
        self.source_text = "random"
        self.names: list[str] = []
        self.shapes: list[list[int]] = []
        # Per level and output: figures of folded vs original, twin vs original, and (levels other than off) the
        # original at that level vs the original with optimisations off (kept per input set: the baseline).
        self.per_level: dict[str, dict[str, tuple[list, list, list]]] = {}
        self.baselines: list[list[Any]] = []
        self.certs: dict[str, FoldCertificate] = {}
        self.extra_sets: dict[str, int] = {}
        self.level_feeds: dict[str, list[dict[str, Any]]] = {}
        self.twin_off: bytes | None = None
        self.twin_on: bytes | None = None
        # onnxruntime's quantized units are counted in the model it builds at the default level (or extended)
        # when verify runs that level anyway, else in sessions of their own at ORT_ENABLE_EXTENDED.
        self.units_level = next((lv for lv in ("default", "all", "extended") if lv in levels), None) \
            if count_units else None
        self.units: tuple[dict, dict] | None = None
        self.skipped_levels: dict[str, str] = {}
        self.tmpdir = tempfile.TemporaryDirectory(prefix="qdqfold-verify-")

    def judge_level(self, lv: str, replaced: Mapping[str, list] | None = None) -> list[OutputCheck]:
        checks = []
        for name in self.names:
            folds, floors, _ = self.per_level[lv][name]
            if replaced is not None:
                folds = replaced[name]
            off_floors = self.per_level["off"][name][1] if "off" in self.per_level else []
            floor_off = max((f[3] for f in off_floors), default=None)
            # With optimisations on, onnxruntime's own rewrites of the original move it too (e.g. its
            # BiasQuantization of a float bias): that is deployment rounding the fold is not judged on.
            drift = [f[3] for f in self.per_level[lv][name][2]] if lv != "off" else []
            if drift:
                floor_off = max(floor_off or 0.0, max(drift))
            checks.append(_judge(name, lv, folds, floors or None, self.tolerance, self.approximate, floor_off,
                                 self.flips.get(name)))
        return checks

    def sessions(self, lv: str) -> dict[str, Any] | None:
        """The sessions of level ``lv``; None when onnxruntime cannot build the original there (the level is
        then skipped, with onnxruntime's reason)."""
        level, tmp, base, fold = _level(lv), self.tmpdir.name, self.base, self.fold
        s: dict[str, Any] = {}
        if lv == "off" and self.plans:
            s["original"] = _session(_exposed_bytes(self.proto, self.exposed_names), level, external_folder=base.folder)
        else:
            try:
                s["original"] = _session(base.source(), level, external_folder=base.folder,
                                         optimized_path=os.path.join(tmp, "original.onnx") if lv == self.units_level
                                         else None)
            except VerifyError as e:
                if lv == "off":
                    raise
                # onnxruntime cannot build the original itself at this level: nothing to compare the fold with.
                reason = str(e).rsplit("FAIL : ", 1)[-1].strip()  # onnxruntime's own sentence, without its prefixes
                self.skipped_levels[lv] = reason
                self.levels.remove(lv)
                if lv == self.units_level:
                    self.units_level = None
                return None
        s["folded"] = _session(fold.source(), level, external_folder=fold.folder,
                               optimized_path=os.path.join(tmp, "folded.onnx") if lv == self.units_level else None)
        if lv == self.units_level:  # the units come from the sessions verify runs anyway
            self.units = (_units_in(os.path.join(tmp, "original.onnx")), _units_in(os.path.join(tmp, "folded.onnx")))
            for name in ("original.onnx", "folded.onnx"):
                os.unlink(os.path.join(tmp, name))
        if lv == self.levels[0] and lv != "off" and self.plans:  # the certificates run with optimisations off
            s["exposing"] = _session(_exposed_bytes(self.proto, self.exposed_names), _level("off"),
                                     external_folder=base.folder)
        if self.twin and self.entries:
            s["twin"] = self.twin_session(lv, level)
        return s

    def twin_session(self, lv: str, level: Any):
        """Optimisations off: the twin as it is. On: its BN betas also move by the bias rounding onnxruntime's
        BiasQuantization applies to the folded layers' float biases (serialised once for those levels)."""
        proto, report, seed, folder = self.proto, self.report, self.seed, self.base.folder
        if lv == "off":
            self.twin_off = self.twin_off or _twin_bytes(proto, report, seed, folder)
            return _session(self.twin_off, level, external_folder=folder)
        if self.twin_on is None:
            spreads = _ort_bias_rounding(self.fold.proto(), report, self.fold.folder)
            self.twin_on = _twin_bytes(proto, report, seed, folder, spreads) if spreads else \
                (self.twin_off or _twin_bytes(proto, report, seed, folder))
        return _session(self.twin_on, level, external_folder=folder)

    def choose_inputs(self, s: Mapping[str, Any]) -> None:
        """The outputs compared and the input sets, from the first level's sessions."""
        import numpy as np

        self.names = [o.name for o in s["folded"].get_outputs()]
        if [o.name for o in s["original"].get_outputs()][: len(self.names)] != self.names:
            raise VerifyError("the folded model's outputs are not the original's")
        if self.inputs is None:
            self.sizes = symbolic_sizes(s["original"], self.dims, self.symbolic_size)
            limits = _index_limits(self.proto)
            self.feed_sets = [random_inputs(s["original"], self.seed + k, self.symbolic_size, self.dims, limits)
                              for k in range(max(self.input_sets, 1))]
            return
        given = list(self.inputs)
        if not given:
            raise VerifyError("no input files given")
        if all(isinstance(i, Mapping) for i in given):
            self.feed_sets = [{k: np.asarray(v) for k, v in i.items()} for i in given]
            self.source_text = "given"
        else:
            self.feed_sets = load_inputs(given, s["original"])  # type: ignore[arg-type]
            self.source_text = ", ".join(os.fspath(i) for i in given)  # type: ignore[arg-type]

    def level(self, lv: str) -> None:
        """Every input set through the sessions of level ``lv``; the certificates at the first level."""
        import numpy as np

        s = self.sessions(lv)
        if s is None:
            return
        if not self.names:
            self.choose_inputs(s)
        names = self.names
        self.per_level[lv] = {n: ([], [], []) for n in names}
        self.level_feeds[lv] = list(self.feed_sets)
        cert_session = None  # built on the first input set, once the exposed activations' types are known
        for index, feeds in enumerate(self.feed_sets):
            try:
                out_original = _run(s["original"], feeds)
                out_folded = _run(s["folded"], feeds)
                out_twin = _run(s["twin"], feeds) if "twin" in s else None
            except Exception as e:
                raise VerifyError(f"onnxruntime cannot run the model: {str(e).strip().splitlines()[0]}") from e
            if not self.shapes:
                self.shapes = [list(np.shape(v)) for v in out_original[: len(names)]]
            if lv == self.levels[0]:
                self.baselines.append(out_original[: len(names)] if lv == "off" else [])
            for k, name in enumerate(names):
                step = self.steps.get(name)
                self.per_level[lv][name][0].append(_figures(out_original[k], out_folded[k], step))
                if lv != "off" and self.baselines[index]:
                    self.per_level[lv][name][2].append(_figures(self.baselines[index][k], out_original[k], step))
                if out_twin is not None:
                    self.per_level[lv][name][1].append(_figures(out_original[k], out_twin[k], step))
            if lv == self.levels[0] and self.plans:  # the certificates: optimisations off, whatever levels run
                cert_session = self.certify(s, feeds, out_original, cert_session)
        self.more_sets(lv, s)

    def certify(self, s: Mapping[str, Any], feeds: Mapping[str, Any], out_original: list, cert_session):
        """The certificates on one input set: the folded layers alone on the original's exposed activations.
        Returns the certificate session (built on the first set; None when the folds cannot be isolated)."""
        import numpy as np

        plans = self.plans
        exposing = s.get("exposing", s["original"])
        out_exposing = out_original if exposing is s["original"] else _run(exposing, feeds)
        exposed = dict(zip([o.name for o in exposing.get_outputs()], out_exposing))
        for name in set(feeds) & set(self.exposed_names):
            exposed[name] = feeds[name]
        if cert_session is None:
            from onnx import helper

            types = {p.x: (helper.np_dtype_to_tensor_dtype(np.asarray(exposed[p.x]).dtype),
                           np.ndim(exposed[p.x])) for p in plans}
            cert_model = _certificate_model(self.fold.proto(), plans, types)
            if cert_model is None:
                self.skipped += [p.node for p in plans]
                self.plans = []
                return None
            cert_session = _derived_session(cert_model, self.fold)
            del cert_model
        cert_inputs = {i.name: exposed[i.name] if i.name in exposed else feeds[i.name]
                       for i in cert_session.get_inputs()}
        cert_out = dict(zip([o.name for o in cert_session.get_outputs()], cert_session.run(None, cert_inputs)))
        for p in plans:
            c = _certify(p, exposed[p.y], cert_out[p.compared], cert_out.get(p.abs_out) if p.abs_out else None)
            key = f"{p.node}->{p.y}"
            if key not in self.certs or c.ratio > self.certs[key].ratio:
                self.certs[key] = c
        return cert_session

    def more_sets(self, lv: str, s: Mapping[str, Any]) -> None:
        """Flips are rare events: on a few input sets the fold may show one where the twin shows none. Before
        calling an output "differs", more random input sets run through original, fold and twin."""
        extra = 0
        while self.inputs is None and "twin" in s and extra < EXTRA_INPUT_SETS and \
                any(c.verdict == "differs" for c in self.judge_level(lv)):
            feeds = random_inputs(s["original"], self.seed + 1000 + extra, self.symbolic_size, self.dims,
                                  _index_limits(self.proto))
            self.level_feeds[lv].append(feeds)
            extra += 1
            out_original, out_folded, out_twin = _run(s["original"], feeds), _run(s["folded"], feeds), \
                _run(s["twin"], feeds)
            for k, name in enumerate(self.names):
                self.per_level[lv][name][0].append(_figures(out_original[k], out_folded[k], self.steps.get(name)))
                self.per_level[lv][name][1].append(_figures(out_original[k], out_twin[k], self.steps.get(name)))
        self.extra_sets[lv] = extra

    def result(self, rewritten: bool) -> VerifyResult:
        """The verdicts per level (a difference attributed to this CPU's integer kernels where it is theirs), the
        result, and onnxruntime's quantized units."""
        import numpy as np

        levels = self.levels
        if not levels:
            raise VerifyError("onnxruntime cannot build the original at any optimisation level asked: " +
                              "; ".join(f"{lv}: {why}" for lv, why in self.skipped_levels.items()))
        level_checks = {lv: self.judge_level(lv) for lv in levels}
        kernels = None
        if all(c.verdict != "differs" for c in level_checks.get("off", [])) and \
                all(c.passed for c in self.certs.values()):
            for lv in levels:
                if lv != "off" and any(c.verdict == "differs" for c in level_checks[lv]):
                    found = _attribute_to_kernels(self.base, self.fold, lv, self.names, self.level_feeds[lv],
                                                  self.steps, level_checks[lv],
                                                  lambda replaced, lv=lv: self.judge_level(lv, replaced))
                    if found is not None:
                        level_checks[lv], kernels = found
                        break
        for checks in level_checks.values():
            for check, shape in zip(checks, self.shapes):
                check.shape, check.elements = shape, int(np.prod(shape)) if shape else 1
        # Folds inside subgraphs (If / Loop / Scan bodies, functions) are not isolated by a certificate.
        self.skipped += [e["node"] for e in _all_folded(self.report) if e["graph"] != "main"]
        result = VerifyResult(outputs=level_checks[levels[0]], tolerance=self.tolerance, seed=self.seed,
                              input_shapes={k: list(v.shape) for k, v in self.feed_sets[0].items()},
                              levels=level_checks, certificates=list(self.certs.values()),
                              uncertified=sorted(set(self.skipped)), input_sets=len(self.feed_sets),
                              input_source=self.source_text, symbolic_dims=self.sizes,
                              extra_input_sets=self.extra_sets, skipped_levels=self.skipped_levels,
                              rewritten="TensorRT's trt:: quantizers rewritten as standard ops for this comparison"
                              if rewritten else None, kernels=kernels)
        self.tmpdir.cleanup()
        self.count_quantized_units(result)
        return result

    def count_quantized_units(self, result: VerifyResult) -> None:
        """onnxruntime forms quantized units only from Q/DQ pairs: a model without them has none to lose."""
        units, units_level = self.units, self.units_level
        if self.count_units and any(n.op_type in ("QuantizeLinear", "DequantizeLinear")
                                    for n in self.base.proto().graph.node):
            if units is None:
                try:
                    units = (quantized_units(self.base), quantized_units(self.fold))
                    units_level = "extended"
                except VerifyError as e:
                    self.skipped_levels.setdefault("extended", str(e))
            if units is not None:
                result.quantized_units_before, result.quantized_units_after = units
                result.units_level = LEVELS[units_level]
