"""Ctrl-C during a single-model run: the command line stops the fold and waits for it to give up before the
process ends (a fold still writing when the interpreter exits aborts the process)."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from qdqfold import interrupts


@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                    reason="needs Python's own Ctrl-C handler")
def test_ctrl_c_waits_for_the_fold_to_give_up(monkeypatch):
    started, told_to_stop, gave_up = threading.Event(), threading.Event(), threading.Event()

    def fold() -> None:
        started.set()
        told_to_stop.wait(30)
        time.sleep(0.2)  # giving up takes a moment (temporary files are removed)
        gave_up.set()

    monkeypatch.setattr(interrupts, "interrupt_running", told_to_stop.set)
    main = threading.main_thread().ident

    def press_ctrl_c() -> None:
        started.wait(30)
        time.sleep(0.05)  # let the main thread block in its wait
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=press_ctrl_c).start()
    with pytest.raises(KeyboardInterrupt):
        interrupts.run_interruptibly(fold)
    assert told_to_stop.is_set() and gave_up.is_set()
