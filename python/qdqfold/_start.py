"""The command line's entry point (the ``qdqfold`` script and ``python -m qdqfold``): Ctrl-C from the first
moment this module runs ends the process with exit status 130 and one line, never a traceback.

Until the command line is ready to stop its own work (``qdqfold.cli.run`` installs its handler), nothing has
been written, so a Ctrl-C during the imports and the parsing of the arguments simply exits. (Before Python
runs this module, SIGINT keeps the system's default action: the process ends by the signal, as cp does.)
"""

import os
import signal
import sys


def _interrupted_while_starting(signum, frame):  # noqa: ARG001 (a signal handler's signature)
    os.write(2, b"qdqfold: interrupted\n")
    os._exit(130)


def main() -> int:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    from .cli import main as cli_main

    status = cli_main()
    _exit_now(status)
    return status  # something is left to do at exit: the interpreter's own exit does it


def _exit_now(status: int) -> None:
    """Ends the process at once with ``status`` when the interpreter's exit has nothing left to do but tear
    itself down (freeing every module and object: about 5 ms of CPU, a sixth of a quiet fold's fixed cost):
    no atexit callback registered (a temporary directory's finalizer, a coverage tool, a library's hook),
    no other thread alive (a worker pool or a Dask client still closing), standard output and error flushed.
    Every output was committed (renamed into place, temporary files removed) before the command line
    returned. Otherwise, or where CPython's atexit cannot tell, the process exits as it always did."""
    import atexit  # built into the interpreter: nothing to load

    callbacks = getattr(atexit, "_ncallbacks", None)
    threading = sys.modules.get("threading")
    if callbacks is None or callbacks() or (threading is not None and threading.active_count() > 1):
        return
    # A profiler, tracer or debugger that ran this in-process (python -m cProfile / trace / pdb -m qdqfold)
    # writes its results after main returns.
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return
    monitoring = getattr(sys, "monitoring", None)  # Python 3.12+: cProfile and coverage use it there
    if monitoring is not None and any(monitoring.get_tool(i) is not None for i in range(6)):
        return
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):  # a closed pipe or stream: the normal exit reports it, as it did
        return
    os._exit(status)
