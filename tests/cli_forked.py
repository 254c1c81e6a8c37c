"""Run many ``longctx`` command lines, each in its own forked process, importing torch once.

``python tests/cli_forked.py CASES_JSON RESULTS_JSON PARALLEL``: ``CASES_JSON`` holds
``{name: [cwd, argv]}``; ``RESULTS_JSON`` gets ``{name: [returncode, stdout, stderr]}``.

Why: a fresh ``longctx`` process spends ~2 CPU seconds importing torch (through the recipe
models) before it can reject a bad input, and the bad-input battery runs ~50 of them. Here
this driver imports the command line and the recipe once; each case is then a ``fork`` of it
that runs ``longctx.launch.cli.main`` exactly as the ``longctx`` script does, with its own
working directory, stdout/stderr files, exit code and atexit handlers, at most ``PARALLEL``
at a time. Nothing is shared between cases but the already imported modules.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import longctx.config.recipe  # noqa: F401  (the torch import every case pays)
from longctx.launch.cli import main


def _child(cwd: str, argv: list[str], out: Path, err: Path) -> None:
    """Run one command line in this forked process and leave it with its exit code."""
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    sys.argv = ["longctx", *argv]
    try:
        code = main(argv)
    except SystemExit as stop:  # what the interpreter does with SystemExit
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_all(cases: dict[str, tuple[str, list[str]]], parallel: int) -> dict[str, list]:
    """Fork one process per case, ``parallel`` at a time; their exit codes and output."""
    scratch = Path(tempfile.mkdtemp(prefix="cli_forked_"))
    pending, running, results = list(enumerate(cases.items())), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            index, (name, (cwd, argv)) = pending.pop(0)
            out, err = scratch / f"{index}.out", scratch / f"{index}.err"
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(cwd, argv, out, err)
            running[pid] = (name, out, err)
        pid, status = os.wait()
        name, out, err = running.pop(pid)
        results[name] = [os.waitstatus_to_exitcode(status), out.read_text(), err.read_text()]
    return results


if __name__ == "__main__":
    cases_file, results_file, parallel = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cases = json.loads(Path(cases_file).read_text())
    Path(results_file).write_text(json.dumps(run_all(cases, parallel)))
