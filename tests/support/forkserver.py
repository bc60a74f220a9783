"""`python train.py ...` without paying Python's start-up each time: a fork server for the tests.

Most of an end-to-end test's CPU time is a new interpreter importing torch (torch itself, then
torch._dynamo, which the first optimizer imports): about 3 CPU seconds before a run does anything,
against well under one for the small runs most tests train. The server imports all of that once per
test worker, then forks a child per run; the child becomes `python ARGS` -- its own process, working
directory, environment, arguments, stdout and stderr -- and exits the way that interpreter would
(atexit handlers, the exit code or the signal that ended it), so the test sees what `subprocess.run`
would have given it.

Only what can be the same goes through it: a script path or `-m module`, and an environment whose
start-up variables (Python's, the OpenMP and allocator ones, torch's own) are the server's, since those
are read when an interpreter or a library starts. Anything else, and every run a test must signal or
watch while it runs, is a real `subprocess`. `DIST_CNN_TEST_FORKSERVER=0` turns it off.

    python -m tests.support.forkserver SOCKET   # the server (started by `run`, one per test worker)
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Variables an interpreter or a library reads when it starts, not when a run reads its options.
START_VARS = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "LD_", "MALLOC_", "GLIBC_", "TORCH", "PYTORCH", "CUDA")
_server: tuple[subprocess.Popen, str, dict] | None = None
_starting = threading.Lock()  # two threads of one test never start two servers


def _start_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(START_VARS)}


def eligible(args: list[str], env: dict, server_env: dict) -> bool:
    """Whether `python ARGS` in `env` behaves the same when forked from a server started in `server_env`."""
    if not args or os.environ.get("DIST_CNN_TEST_FORKSERVER", "1") == "0":
        return False
    runs_script = args[0].endswith(".py") or (args[0] == "-m" and len(args) > 1)
    return runs_script and _start_env(env) == _start_env(server_env)


def run(args: list[str], *, cwd, env: dict, timeout: float, server_env: dict) -> subprocess.CompletedProcess | None:
    """`subprocess.run([python, *args], capture_output=True, text=True)` through this worker's server
    (started in `server_env` if it is not running); None where forking would not be the same."""
    if not eligible(args, env, _server[2] if _server else server_env):
        return None
    proc, path, _ = _ensure_server(server_env)
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn,
    ):
        conn.connect(path)
        request = json.dumps({"args": args, "cwd": str(cwd), "env": env}).encode()
        socket.send_fds(conn, [request], [out.fileno(), err.fileno()])
        replies = conn.makefile("r")
        pid = json.loads(replies.readline())["pid"]
        conn.settimeout(timeout)
        try:
            line = replies.readline()
        except TimeoutError:
            _kill(pid)
            raise subprocess.TimeoutExpired([sys.executable, *args], timeout) from None
        if not line:
            raise RuntimeError(f"the fork server (pid {proc.pid}) ended while running {args}")
        status = json.loads(line)["status"]
        out.seek(0), err.seek(0)
        stdout, stderr = (f.read().decode(errors="replace") for f in (out, err))
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return subprocess.CompletedProcess([sys.executable, *args], code, stdout, stderr)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _ensure_server(server_env: dict) -> tuple[subprocess.Popen, str, dict]:
    with _starting:
        if _server is None or _server[0].poll() is not None:
            _start_server(server_env)
        return _server


def _start_server(server_env: dict) -> None:
    global _server
    home = tempfile.mkdtemp(prefix="dist-cnn-forkserver-")
    path = os.path.join(home, "socket")
    with open(os.path.join(home, "server.log"), "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.forkserver", path],
            cwd=Path(__file__).resolve().parents[2],
            env=server_env,
            stdin=subprocess.PIPE,  # its end: the server exits when this worker does, however it ends
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"the tests' fork server did not start:\n{Path(home, 'server.log').read_text()[-3000:]}")
    atexit.register(_stop, proc, home)
    _server = (proc, path, server_env)


def _stop(proc: subprocess.Popen, home: str) -> None:
    proc.kill()
    proc.wait()
    shutil.rmtree(home, ignore_errors=True)


# ---- the server ------------------------------------------------------------------------------


def serve(path: str) -> None:
    import torch  # noqa: F401  (what every run imports first)
    import torch._dynamo  # noqa: F401  (the first optimizer imports it)

    import dist_cnn.commands  # noqa: F401

    threading.Thread(target=_exit_with_the_worker, daemon=True).start()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        request, fds, _, _ = socket.recv_fds(conn, 1 << 22, 2)
        pid = os.fork()
        if pid == 0:
            listener.close()
            conn.close()
            # the script's end is this process's end: a return exits 0, an exception or SystemExit
            # leaves the interpreter as it would leave `python ARGS`
            _become(json.loads(request), fds)
            return
        for fd in fds:
            os.close(fd)
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        threading.Thread(target=_report, args=(conn, pid), daemon=True).start()


def _exit_with_the_worker() -> None:
    # os.read, not sys.stdin: a forked child must not inherit a lock held by this thread
    while os.read(0, 4096):
        pass
    os._exit(0)  # end of file: the test worker has gone


def _report(conn: socket.socket, pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    with conn:
        try:
            conn.sendall(json.dumps({"status": status}).encode() + b"\n")
        except OSError:  # the test stopped waiting (its timeout)
            pass


def _become(request: dict, fds: list[int]) -> None:
    """In the forked child: turn into `python ARGS` in the request's directory and environment."""
    sys.stdout.flush(), sys.stderr.flush()
    stdin = os.open(os.devnull, os.O_RDONLY)  # not the server's: that pipe is how it sees its worker go
    for target, fd in ((0, stdin), (1, fds[0]), (2, fds[1])):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    args = request["args"]
    if args[0] == "-m":
        sys.argv = ["-m", *args[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        script = os.path.abspath(args[0])
        sys.argv = [args[0], *args[1:]]
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    serve(sys.argv[1])
