"""A pre-imported `hybridprune` that forks one real process per command (for the kill tests).

A plain `python -m hybridprune ...` spends most of its life importing torch and transformers
(about 8 s on a busy 2-core machine, 0.5 s of actual work on a tiny model), so killing it "at a
random point" would almost always hit the import. This server imports once, then forks a child
per request that runs exactly what `python -m hybridprune ARGV` runs (`hybridprune.cli.main.main`)
in its own process, with its own environment, working folder and output files. The children are
real processes: SIGINT and SIGKILL reach them like any other.

Protocol (one JSON object per line): the client writes
  {"op": "run", "argv": [...], "env": {...}, "cwd": "...", "out": "...", "err": "...",
   "fsize": bytes or null, "prelude": python code or null}
and reads {"pid": N} at once; later it writes {"op": "wait", "pid": N} and reads
  {"pid": N, "rc": exit code or null, "signal": signal number or null}.
`fsize` sets RLIMIT_FSIZE in the child (writes past it fail with EFBIG: a full disk);
`prelude` runs in the child before the command (to kill it at one precise point).
Run it as `python tests/forkserver.py`; it prints {"ready": true} once imported.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys


def preload() -> None:
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import hybridprune.calibration.session  # noqa: F401
    import hybridprune.cli.main  # noqa: F401
    import hybridprune.models.weights  # noqa: F401

    transformers.utils.logging.disable_progress_bar()


def child(request: dict) -> None:
    """Become the command: never returns."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for name, value in request.get("env", {}).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        os.chdir(request.get("cwd") or os.getcwd())
        for fd, path in ((1, request["out"]), (2, request["err"])):
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(handle, fd)
            os.close(handle)
        if request.get("fsize"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], resource.RLIM_INFINITY))
        from hybridprune.cli.main import main

        if request.get("prelude"):
            exec(request["prelude"], {"__name__": "prelude"})
        main(request["argv"])
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException as err:  # noqa: BLE001 - report anything, then die like a process would
        print(f"forkserver child: {type(err).__name__}: {err}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "run":
            pid = os.fork()
            if pid == 0:
                try:
                    child(request)
                finally:
                    os._exit(70)  # a signal that lands between the command and its exit must not resume the server loop
            reply = {"pid": pid}
        elif request["op"] == "wait":
            _, status = os.waitpid(request["pid"], 0)
            reply = {
                "pid": request["pid"],
                "rc": os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None,
                "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            }
        else:
            reply = {"error": f"unknown op {request['op']!r}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve()
