"""A pytest plugin that records every fold the test suite runs, to prove a refactoring changes no output.

    QDQFOLD_RECORD=before.jsonl python -m pytest -q tests -p tools.record_folds   # on the old code
    QDQFOLD_RECORD=after.jsonl  python -m pytest -q tests -p tools.record_folds   # on the new code
    python tools/record_folds.py before.jsonl after.jsonl                         # compares, exit 1 if any differ

Each call of qdqfold_native.fold, fold_with_report and fold_file made inside the test process is one line:
the test's node id and the call's number within it (the key), a hash of the input and of the options, and a
hash of what came out (the bytes, the files written, or the error's type and message) plus the report's
per-BN outcomes (folded or kept, direction, reason). Folds run in subprocesses (the CLI tests) are not seen;
tools/fold_corpus.py covers the command-line path on every sample and bench model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fold_corpus import outcome_rows  # noqa: E402  (the rows fold_corpus compares)


def _sha(data) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()[:20]


def _outcomes(report) -> list:
    return outcome_rows(report) if isinstance(report, dict) else []


def _options(kwargs) -> str:
    return _sha(json.dumps({k: repr(v) for k, v in sorted(kwargs.items())}).encode())


class _Recorder:
    def __init__(self, path: str):
        self.file = open(path, "w", encoding="utf-8")
        self.test = "<collection>"
        self.calls = 0

    def write(self, entry: dict) -> None:
        self.calls += 1
        entry = {"key": f"{self.test}#{self.calls}", **entry}
        self.file.write(json.dumps(entry, sort_keys=True) + "\n")
        self.file.flush()


_recorder: _Recorder | None = None


def _input_hash(model) -> str:
    try:
        return _sha(memoryview(model).cast("B"))
    except TypeError:
        return "unhashable"


def _files_hash(report, dst) -> str:
    h = hashlib.sha256()
    paths = [dst] if dst is not None else []
    paths += list(report.get("data_files", [])) if isinstance(report, dict) else []
    for p in paths:
        try:
            h.update(Path(p).name.encode() + b"\0" + Path(p).read_bytes())
        except OSError as e:
            h.update(f"unreadable {type(e).__name__}".encode())
    return h.hexdigest()[:20]


def _wrap(native) -> None:
    fold, fold_with_report, fold_file = native.fold, native.fold_with_report, native.fold_file

    def record(kind, inputs, opts, call):
        try:
            value = call()
        except BaseException as e:
            _recorder.write({"kind": kind, "input": inputs, "options": opts,
                             "error": f"{type(e).__name__}: {e}"})
            raise
        return value

    def w_fold(model, **kwargs):
        out = record("fold", _input_hash(model), _options(kwargs), lambda: fold(model, **kwargs))
        _recorder.write({"kind": "fold", "input": _input_hash(model), "options": _options(kwargs),
                         "output": _sha(out)})
        return out

    def w_fold_with_report(model, **kwargs):
        out, report = record("fold_with_report", _input_hash(model), _options(kwargs),
                             lambda: fold_with_report(model, **kwargs))
        _recorder.write({"kind": "fold_with_report", "input": _input_hash(model), "options": _options(kwargs),
                         "output": _sha(out), "outcomes": _outcomes(report)})
        return out, report

    def w_fold_file(src, dst, **kwargs):
        try:  # only regular files: a FIFO or device would block or never end
            path = Path(os.fspath(src))
            src_hash = _sha(path.read_bytes()) if path.is_file() else "not-a-regular-file"
        except (OSError, TypeError):
            src_hash = "unreadable"
        report = record("fold_file", src_hash, _options(kwargs), lambda: fold_file(src, dst, **kwargs))
        dst_path = None if dst is None else os.fspath(dst)
        _recorder.write({"kind": "fold_file", "input": src_hash, "options": _options(kwargs),
                         "output": _files_hash(report, dst_path), "outcomes": _outcomes(report)})
        return report

    for name, f, orig in (("fold", w_fold, fold), ("fold_with_report", w_fold_with_report, fold_with_report),
                          ("fold_file", w_fold_file, fold_file)):
        f.__doc__ = orig.__doc__
        f.__wrapped__ = orig
        setattr(native, name, f)


def pytest_configure(config):
    global _recorder
    path = os.environ.get("QDQFOLD_RECORD")
    if not path or _recorder is not None:
        return
    import qdqfold_native

    _recorder = _Recorder(path)
    _wrap(qdqfold_native)


def pytest_runtest_setup(item):
    if _recorder is not None:
        _recorder.test = item.nodeid
        _recorder.calls = 0


def compare(before: str, after: str) -> int:
    """Calls are matched by (kind, input hash, options hash), not by test name, so renamed or moved tests still
    compare; a key seen several times must give the same result every time in both runs."""
    def load(path):
        entries: dict[tuple, set] = {}
        for line in Path(path).read_text().splitlines():
            e = json.loads(line)
            e.pop("key")
            key = (e.pop("kind"), e.pop("input"), e.pop("options"))
            if "error" in e:  # pytest's numbered temporary directories differ from run to run
                e["error"] = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/", "<tmp>/", e["error"])
            entries.setdefault(key, set()).add(json.dumps(e, sort_keys=True))
        return entries

    a, b = load(before), load(after)
    common = sorted(set(a) & set(b))
    differ = [k for k in common if a[k] != b[k]]
    print(f"{len(a)} distinct folds before, {len(b)} after, {len(common)} in both: {len(common) - len(differ)} "
          f"identical, {len(differ)} differ; {len(set(a) - set(b))} only before, {len(set(b) - set(a))} only "
          f"after (tests that build a random model or a new test)")
    for k in differ[:50]:
        print(f"DIFFERS {k}\n  before {sorted(a[k])}\n  after  {sorted(b[k])}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(compare(sys.argv[1], sys.argv[2]))
