"""The command line's entry point (the ``qdqfold`` script and ``python -m qdqfold``): Ctrl-C from the first
moment this module runs ends the process with exit status 130 and one line, never a traceback.

Until the command line is ready to stop its own work (``qdqfold.cli.run`` installs its handler), nothing has
been written, so a Ctrl-C during the imports and the parsing of the arguments simply exits. (Before Python
runs this module, SIGINT keeps the system's default action: the process ends by the signal, as cp does.)
"""

import os
import signal


def _interrupted_while_starting(signum, frame):  # noqa: ARG001 (a signal handler's signature)
    os.write(2, b"qdqfold: interrupted\n")
    os._exit(130)


def main() -> int:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    from .cli import main as cli_main

    return cli_main()
