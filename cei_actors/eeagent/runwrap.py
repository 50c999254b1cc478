"""The Python process wrapper (``ProcessSupervisor(wrapper="python")``; the default is the
shell wrapper ``supervisor.SH_WRAPPER``, ten times cheaper to start, see decision EA2).

Usage (the supervisor runs this file as a script, ``python -I -S runwrap.py``, so it needs
nothing but the standard library and no import path)::

    runwrap.py STATUS_FILE CWD -- COMMAND [ARGS...]

It changes to ``CWD`` (empty: stay), starts ``COMMAND`` as its child in the same process group
(the group the supervisor created with ``setsid``), waits for it and then atomically writes
``STATUS_FILE`` as one JSON object::

    {"exit_code": 3, "signal": null, "pid": 1234, "ended_at": 1700000000.123}

``exit_code`` follows the subprocess convention (``-N`` when killed by signal ``N``). If the
command cannot be started the file holds ``{"exit_code": null, "error": "..."}``.

The wrapper's own exit comes after the file is written, so whoever watches the wrapper's pid
(the supervisor, with a pidfd) always finds the status when it sees the exit, and an agent that
was down while the command ended can still report the true exit code.

SIGTERM, SIGINT and SIGHUP are caught (not ignored, so the command gets default dispositions
after exec) and do nothing in the wrapper: the supervisor signals the whole group, the command
reacts, and the wrapper lives on to record the result. SIGKILL ends both.
"""

import os
import signal
import sys
import time


def _write_status(path: str, text: str) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _ignore(signum, frame):
    return None


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        sys.stderr.write("usage: runwrap.py STATUS_FILE CWD -- COMMAND [ARGS...]\n")
        return 2
    status_path, cwd, command = argv[0], argv[1], argv[3:]
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _ignore)
    # Signals Python ignores at startup must be back to default in the command.
    restore = tuple(
        getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ", "SIGXFZ") if hasattr(signal, name)
    )
    try:
        if cwd:
            os.chdir(cwd)
        os.closerange(3, 65536)
        pid = os.posix_spawnp(
            command[0], command, dict(os.environ), setsigdef=restore, setsigmask=()
        )
    except OSError as exc:
        import json

        where = f" in {cwd!r}" if cwd else ""
        msg = f"cannot run {command[0]!r}{where}: {exc.strerror or exc}"
        sys.stderr.write(f"runwrap: {msg}\n")
        sys.stderr.flush()
        _write_status(
            status_path,
            json.dumps({"exit_code": None, "signal": None, "error": msg, "ended_at": time.time()}),
        )
        return 127
    while True:
        try:
            _, wstatus = os.waitpid(pid, 0)
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries already
            continue
    code = os.waitstatus_to_exitcode(wstatus)
    sig = -code if code < 0 else None
    _write_status(
        status_path,
        f'{{"exit_code": {code}, "signal": {"null" if sig is None else sig}, '
        f'"pid": {pid}, "ended_at": {time.time():.6f}}}',
    )
    return code if code >= 0 else 128 + (sig or 0)


if __name__ == "__main__":
    sys.stdout.flush()
    os._exit(main(sys.argv[1:]))
