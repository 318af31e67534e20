"""torchrun, keeping flux-dist's exit codes and saying in one line per failed rank why it failed.

Plain torchrun turns any failed rank into exit code 1 and a 30-line ``ChildFailedError`` traceback.
This runs the same launcher (``torch.distributed.run``, the same arguments) in-process and, when a
rank fails, prints ``flux-dist: rank R failed (exit C): MESSAGE`` for each failed rank (the message
each rank left in the error file torchrun gives it, see ``flux_dist/preflight.py``) and exits with
the first failed rank's code: 2 bad input, 3 some batch lines failed, 1 an internal error, 128 + N
a rank killed by signal N. Usage is torchrun's::

    python launch/torchrun.py --standalone --nproc-per-node 2 -m flux_dist generate --config ...

``FLUX_DIST_LAUNCH_VERBOSE=1`` keeps torchrun's own log lines.
"""

from __future__ import annotations

import logging
import os
import sys

NO_MESSAGE = "To enable traceback see"  # torchrun's text when a rank left no error file


def _quiet() -> None:
    if os.environ.get("FLUX_DIST_LAUNCH_VERBOSE") != "1":
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
        logging.getLogger("torch.distributed.run").setLevel(logging.ERROR)


def exit_code(failure) -> int:
    """The code the rank meant to exit with (from its error file: a rank stopping with code 2 may be ended by
    torchrun's SIGTERM first), else its real one; a signal N as 128 + N."""
    data = failure.error_file_data if isinstance(failure.error_file_data, dict) else {}
    code = data.get("flux_dist_exit_code")
    if isinstance(code, int):
        return code
    return 128 - failure.exitcode if failure.exitcode < 0 else failure.exitcode


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    _quiet()
    try:
        run(args)
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        for rank, f in sorted(e.failures.items()):
            msg = f.message if isinstance(f.message, str) else str(f.message.get("message", f.message))
            if not msg or msg.startswith(NO_MESSAGE):
                msg = "no message (see its output above)"
            print(f"flux-dist: rank {rank} failed (exit {exit_code(f)}): {' '.join(msg.split())}",
                  file=sys.stderr, flush=True)
        return exit_code(first) or 1
    except SignalException as e:
        print(f"flux-dist: launcher stopped by signal {e.sigval.name}; ranks stopped", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
