"""Ctrl-C in the command line: the fold runs on a worker thread, so that the main thread sees the signal at
once and stops it (no partial output); the handler the command line installs for the length of a run."""

from __future__ import annotations

from .files import _interrupted  # noqa: PLC2701 (the CLI owns the Ctrl-C of its process)
from .files import interrupt_running

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers read the name as True)
if TYPE_CHECKING:
    from typing import Any


def run_interruptibly(function, *arguments, **keywords):
    """Runs ``function`` on a worker thread so that Ctrl-C reaches this one at once: it then stops the fold
    (files.interrupt_running: no partial output, temporary files removed), waits for the worker to give up,
    and raises KeyboardInterrupt. (A plain thread: concurrent.futures costs a run some milliseconds to import.)

    The wait is on an Event, not Thread.join: on Python 3.11 a Ctrl-C that interrupts join() marks the still
    running thread as stopped, so the process would exit under a fold still writing (and abort)."""
    import threading

    outcome: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            outcome["value"] = function(*arguments, **keywords)
        except BaseException as e:  # handed to the caller, as a future's result() would
            outcome["error"] = e
        finally:
            done.set()

    worker = threading.Thread(target=work, name="qdqfold-fold")
    worker.start()
    try:
        wait_for(done)
    except KeyboardInterrupt:
        interrupt_running()
        wait_for(done, stoppable=False)
        raise
    finally:
        if done.is_set():
            worker.join()
    if "error" in outcome:
        raise outcome.pop("error")
    return outcome["value"]


#: How often a wait of the main thread wakes up: a SIGINT the system delivered to another thread of the process
#: is handled by Python only when the main thread runs, which a wait on a lock alone would postpone.
POLL_SECONDS = 0.1


def wait_for(event, stoppable: bool = True) -> None:
    """Waits for ``event``, waking every POLL_SECONDS so that Ctrl-C is seen at once. Not ``stoppable``: a
    Ctrl-C meanwhile (a second one, after the folds were told to stop) does not end the wait."""
    while True:
        try:
            if event.wait(POLL_SECONDS):
                return
        except KeyboardInterrupt:
            if stoppable:
                raise


def _on_ctrl_c(signum, frame) -> None:  # noqa: ARG001 (a signal handler's signature)
    """SIGINT while the command line runs: the folds are told to stop at once (no partial output), whatever
    the main thread is doing, and the main thread gets KeyboardInterrupt (once: a second Ctrl-C while the
    folds give up is not another exception). The exit status is 130 even if a library swallows the exception."""
    first = not _interrupted.is_set()
    interrupt_running()
    if first:
        raise KeyboardInterrupt


def handle_ctrl_c():
    """Installs _on_ctrl_c; returns the handler to restore, or None when this is not the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, _on_ctrl_c)
