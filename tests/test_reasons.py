"""The table of reason codes and fold names (cpp/folds/reasons.h, qdqfold_native.reasons()): docs/reasons.md
(generated from it by tools/make_docs.py; tests/test_docs.py checks it is up to date) lists every entry as it
is, its options and flags exist, and every code a fold reports is in it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import qdqfold_native

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "tests" / "models"
AFFINE_OPS = ("mul", "add", "sub", "div")


def table() -> dict[str, dict]:
    return {e["code"]: e for e in qdqfold_native.reasons()}


def affine_variant(fold: str, op: str) -> str:
    """The name a BN fold gets when an elementwise affine node of `op` is folded by it (affine_variant_name)."""
    return "-".join(op if token == "bn" else token for token in fold.split("-"))


def docs_rows() -> dict[str, tuple[str, str, str]]:
    """code -> (kind, option, flag) from the table of docs/reasons.md (its second table: the affine names)."""
    page = ROOT / "docs" / "reasons.md"
    if not page.is_file():
        pytest.skip("docs/ is not beside the tests (an installed wheel is being tested)")
    section = page.read_text(encoding="utf-8").split("| code | kind | meaning | option | CLI flag |", 1)[1]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([a-z0-9-]+)` \| (kept|fold) \| [^|]+ \| (`([a-z_]+)`)? \| (`(--[a-z-]+)`)? \|$", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(4) or "", m.group(6) or "")
    return rows


def test_every_entry_has_a_code_a_kind_and_a_meaning():
    entries = qdqfold_native.reasons()
    codes = [e["code"] for e in entries]
    assert len(codes) == len(set(codes)), "a code is listed twice"
    for e in entries:
        assert set(e) == {"code", "kind", "meaning", "option", "flag"}
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", e["code"]), e
        assert e["kind"] in ("kept", "fold") and e["meaning"], e
        assert bool(e["option"]) >= bool(e["flag"]), f"{e['code']}: a flag without its option"


def test_the_docs_list_the_table():
    entries = table()
    rows = docs_rows()
    assert rows, "no table of codes in docs/reasons.md"
    for code, (kind, option, flag) in rows.items():
        assert code in entries, f"docs/reasons.md lists {code}, which reasons() does not"
        e = entries[code]
        assert (kind, option, flag) == (e["kind"], e["option"], e["flag"]), code
    folds = [c for c, r in rows.items() if r[0] == "fold"]
    variants = {affine_variant(f, op) for f in folds for op in AFFINE_OPS if "bn" in f.split("-")}
    listed = set(re.findall(r"`([a-z0-9-]+)`", (ROOT / "docs" / "reasons.md").read_text(encoding="utf-8")
                            .split("| BN fold | names for Mul / Add / Sub / Div |", 1)[1]))
    assert listed - set(folds) == variants & set(entries), "docs/reasons.md's affine names are not reasons()'s"
    for code in entries:
        assert code in rows or code in variants, f"reasons() has {code}, which docs/reasons.md lacks"


def test_options_and_flags_exist():
    options = set(qdqfold_native.options()) | {"shapes"}  # shapes: a keyword, not a switch (core/options.h)
    help_text = subprocess.run([sys.executable, "-m", "qdqfold", "--help"], capture_output=True, text=True,
                               check=True).stdout
    for e in qdqfold_native.reasons():
        if e["option"]:
            assert e["option"] in options, e
        if e["flag"]:
            assert e["flag"] in help_text, e


def test_the_stub_declares_reasons():
    stub = (ROOT / "python" / "qdqfold_native.pyi").read_text(encoding="utf-8")
    assert re.search(r"^def reasons\(\) -> list\[ReasonEntry\]: \.\.\.$", stub, re.M)
    entry = stub.split("class ReasonEntry(TypedDict):", 1)[1].split("\n\n", 1)[0]
    assert set(re.findall(r"^    (\w+):", entry, re.M)) == {"code", "kind", "meaning", "option", "flag"}


OPTION_SETS = [
    {},
    {"fold_forward": False},
    {"fold_backward": False},
    {"fold_affine": False},
    {"pad_correction": True},
    {"allow_opset_upgrade": True, "allow_nonzero_zero_point": True},
    {"materialize_quantized_weights": True},
    {"drop_activation_quantizers": True},
    {"freeze_initializer_inputs": True},
    {"merge_branches": True, "requantize_merged": True},
]


@pytest.mark.parametrize("model", sorted(p.name for p in MODELS.glob("*.onnx")))
def test_every_code_the_sample_models_report_is_in_the_table(model):
    entries = table()
    data = (MODELS / model).read_bytes()
    for options in OPTION_SETS:
        _, report = qdqfold_native.fold_with_report(data, **options)
        for bn in report["batchnorms"]:
            assert bn["code"] in entries, (model, options, bn["node"], bn["code"])
            assert entries[bn["code"]]["kind"] == ("fold" if bn["folded"] else "kept"), (model, bn["code"])
        for merge in report.get("merged_branches", []):
            code = merge.get("code")
            assert code is None or code in entries, (model, options, code)
