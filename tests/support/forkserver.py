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

A forked run that is torchrun's agent (or starts one in-process) forks its ranks the same way: torchrun's
`SubprocessHandler` gets a `Popen` whose child is forked from the agent -- which has imported torch --
instead of a new interpreter; the agent still starts, watches, signals and reaps each rank as its own
process in its own session. The variables torchrun sets for its ranks (`OMP_NUM_THREADS`, applied with
`torch.set_num_threads` as torch applies it at import; `TORCHELASTIC_*`, `TORCH_NCCL_*`, read at run
time) are the only start-up variables allowed to differ there.

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


# What torchrun sets for its ranks that is read at run time, or applied in the child (OMP_NUM_THREADS).
RANK_VARS = ("OMP_NUM_THREADS", "TORCHELASTIC_", "TORCH_NCCL_")


def _start_env(env: dict, ignore: tuple = ()) -> dict:
    return {k: v for k, v in env.items() if k.startswith(START_VARS) and not k.startswith(ignore)}


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
    start_env = dict(os.environ)  # before torch's imports add to it
    import torch  # noqa: F401  (what every run imports first)
    import torch._dynamo  # noqa: F401  (the first optimizer imports it)

    import dist_cnn.commands  # noqa: F401

    _fork_torchrun_ranks(start_env)

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
    _run_python(request["args"])


def _run_python(args: list[str]) -> None:
    """Run `python ARGS`'s script or module as __main__, with its argv and sys.path[0]."""
    if args[0] == "-m":
        sys.argv = ["-m", *args[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        script = os.path.abspath(args[0])
        sys.argv = [args[0], *args[1:]]
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")


# ---- torchrun's ranks, forked from its agent -------------------------------------------------


def _fork_torchrun_ranks(start_env: dict) -> None:
    """Make torchrun's SubprocessHandler fork the ranks it can (see the module's docstring)."""
    from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler

    new_interpreter = subprocess_handler.SubprocessHandler._popen

    def _popen(handler, args: tuple, env: dict) -> subprocess.Popen:
        script_args = _python_args(list(args))
        threads = env.get("OMP_NUM_THREADS", start_env.get("OMP_NUM_THREADS"))
        same = (
            script_args is not None
            and eligible(script_args, env, env)
            and _start_env(env, RANK_VARS) == _start_env(start_env, RANK_VARS)
            and (threads is None or threads.isdigit())
            and ("OMP_NUM_THREADS" in env or "OMP_NUM_THREADS" not in start_env)
        )
        if not same:
            return new_interpreter(handler, args, env)
        return _ForkedRank(list(args), env=env, stdout=handler._stdout, stderr=handler._stderr)

    subprocess_handler.SubprocessHandler._popen = _popen


def _python_args(args: list[str]) -> list[str] | None:
    """ARGS of `python [-u] ARGS` where that python is this one and stdio is unbuffered either way."""
    if not args or args[0] != sys.executable:
        return None
    rest = args[1:]
    if rest[:1] == ["-u"]:
        if not getattr(sys.stdout, "write_through", False):  # this interpreter's stdio is not unbuffered
            return None
        rest = rest[1:]
    return rest


class _ForkedRank(subprocess.Popen):
    """A Popen whose child is forked from this process and becomes `python ARGS` (torchrun's own
    arguments: its own session, its environment, its stdout and stderr); everything else -- poll,
    wait, signals, the exit status -- is Popen's own on a child it started."""

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, *handles_and_flags):
        c2pwrite, errwrite = handles_and_flags[6], handles_and_flags[8]
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _become_rank(_python_args(list(args)), cwd, env, c2pwrite, errwrite)
        self.pid, self._child_created = pid, True


def _become_rank(args: list[str], cwd, env: dict, stdout: int, stderr: int) -> None:
    """In the rank's forked child (never returns): a new session, as torchrun asks; its output; the
    environment; signal handlers and exit handlers as a new interpreter has them; then `python ARGS`."""
    code = 1
    try:
        os.setsid()
        for target, fd in ((1, stdout), (2, stderr)):
            if fd != -1:
                os.dup2(fd, target)
        if cwd is not None:
            os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        atexit._clear()  # the agent's exit handlers are not the rank's

        import torch

        if "OMP_NUM_THREADS" in env:  # what torch does with it at import
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        code = _exit_code(_run_python, args)
    finally:
        os._exit(code)


def _exit_code(run, *args) -> int:
    """Run, then end as the interpreter ends: non-daemon threads joined, exit handlers run, the exit
    code of SystemExit, 1 after an uncaught exception's traceback, or the signal of a KeyboardInterrupt."""
    code, interrupted = 0, False
    try:
        run(*args)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code, interrupted = 1, True
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


if __name__ == "__main__":
    serve(sys.argv[1])
