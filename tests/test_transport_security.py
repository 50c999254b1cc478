"""Authenticated frames and restricted unpickling on the TCP actor system (docs/decisions.md S1).

An impostor sends pickles whose unpickling would run ``touch MARKER`` (``__reduce__`` to
``os.system`` or ``subprocess.Popen``) straight to the admin's port and to an actor's port of
a real system started with ``up``: without the secret, from another uid, and with the secret
but naming a class outside the allowlist. Each is refused and logged, the marker never
appears, and the system keeps working.
"""

from __future__ import annotations

import os
import pickle
import secrets
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_launch_system import make_plan, wait_for
from thespian.system.transport.streamBuffer import ackDataErrMsg

from cei_actors.launch.launcher import connect, down, up
from cei_actors.launch.plan import load_plan
from cei_actors.runtime import secure
from cei_actors.runtime.control import Request, Response, Status
from cei_actors.runtime.secure import (
    RefusedFrame,
    SecretError,
    new_secret_file,
    read_secret,
    restricted_loads,
    seal,
)
from cei_actors.runtime.system import global_actors

NOBODY = 65534


class _Touch:
    """Unpickles as ``os.system("touch PATH")``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _Spawn:
    """Unpickles as ``subprocess.Popen(["touch", PATH])`` (a class, but not an allowed one)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.path)],))


def frame(payload: bytes) -> bytes:
    """thespian's TCP framing: ``b"<len>>" + payload``."""
    return f"{len(payload)}>".encode() + payload


def send_raw(port: int, data: bytes, timeout: float = 15.0) -> bytes:
    """Connect to 127.0.0.1:port, send ``data``, return what comes back until the peer closes."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        while True:
            try:
                chunk = s.recv(4096)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
    return out


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    home = tmp / "home"
    info = up(load_plan(make_plan(tmp), home=home), home)
    conn = connect(home)
    try:
        pd = conn.leader("pd")
        yield {
            "home": home,
            "tmp": tmp,
            "conn": conn,
            "targets": {  # name: (port, pid of the process listening there)
                "admin": (info["admin_port"], info["admin_pid"]),
                "pd actor": (pd.addressDetails.connectArgs[0][1], info["pids"]["pd"]),
            },
        }
    finally:
        conn.close()
        down(home)


def refusals(home: Path, pid: int, what: str = "refused a message") -> int:
    """Lines in the system log where process ``pid`` logged a refusal containing ``what``."""
    text = (home / "system.log").read_text(errors="replace")
    return sum(1 for line in text.splitlines()
               if f" {pid} cei_actors.transport WARNING " in line and what in line)


def attack(system, name: str, make_payload, what: str) -> None:
    """Send the frame ``make_payload(marker)`` to target ``name``: refused, logged, no marker."""
    home = system["home"]
    port, pid = system["targets"][name]
    marker = system["tmp"] / f"pwned-{secrets.token_hex(4)}"
    before = refusals(home, pid, what)
    reply = send_raw(port, make_payload(marker))
    assert not marker.exists(), f"{name} unpickled the impostor's payload"
    assert reply == ackDataErrMsg, f"{name}: {reply!r}"
    assert wait_for(lambda: refusals(home, pid, what) > before, timeout=10), \
        f"{name} did not log the refusal ({what!r})"
    assert not marker.exists()


def still_serving(system) -> None:
    conn = system["conn"]
    assert {"pd", "epum", "provisioner"} <= set(global_actors(conn.asys))
    status = conn.status()["components"]
    assert all(r["leader"] and r["ready"] for reps in status.values() for r in reps), status


def test_impostor_without_the_secret_is_refused_at_admin_and_actor_ports(system):
    sender = None  # thespian expects (sender address, message); refused before it looks
    for name in system["targets"]:
        # a bare pickle, as an unpatched thespian would send it
        attack(system, name, lambda m: frame(pickle.dumps((sender, _Touch(m)))),
               "unauthenticated frame")
        # a well-formed frame signed with a key of its own
        attack(system, name, lambda m: frame(seal(secrets.token_bytes(32), (sender, _Touch(m)))),
               "unauthenticated frame")
    still_serving(system)


def test_peer_with_the_secret_cannot_unpickle_other_classes(system):
    key = read_secret(system["home"] / "secret")
    for name in system["targets"]:
        attack(system, name, lambda m: frame(seal(key, (None, _Touch(m)))), "posix.system")
        attack(system, name, lambda m: frame(seal(key, (None, _Spawn(m)))), "subprocess.Popen")
    still_serving(system)


def as_other_uid(secret: Path, sends: list[tuple[int, bytes]]) -> list[str]:
    """In a forked child running as uid/gid 65534: try to read ``secret``, then send each
    ``(port, data)`` raw and collect the replies. Returns ``["no secret" | "read the secret",
    reply hex, ...]``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: stdlib calls only, then _exit
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = []
            try:
                secret.read_bytes()
                out.append("read the secret")
            except PermissionError:
                out.append("no secret")
            out += [send_raw(port, data).hex() for port, data in sends]
            os.write(write_end, "\n".join(out).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        text = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, text
    return text.split("\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the impostor as another uid (setuid 65534)")
def test_another_uid_cannot_read_the_secret_and_is_refused(system):
    home, tmp = system["home"], system["tmp"]
    secret = home / "secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    markers, sends, before = [], [], {}
    for name, (port, pid) in system["targets"].items():
        marker = tmp / f"pwned-by-nobody-{name.replace(' ', '-')}"
        markers.append(marker)
        sends.append((port, frame(pickle.dumps((None, _Touch(marker))))))
        before[pid] = refusals(home, pid)
    out = as_other_uid(secret, sends)
    assert out[0] == "no secret", out  # 0600, owned by the system's user
    assert not [m for m in markers if m.exists()], "the impostor's payload ran"
    assert out[1:] == [ackDataErrMsg.hex()] * len(sends), out
    for pid, n in before.items():
        assert wait_for(lambda pid=pid, n=n: refusals(home, pid) > n, timeout=10), pid
    still_serving(system)


def test_a_flood_of_impostors_is_logged_in_bounded_lines(system):
    home = system["home"]
    port, pid = system["targets"]["admin"]
    before = refusals(home, pid)
    n = 3 * secure.LOG_BURST
    for _ in range(n):
        assert send_raw(port, frame(pickle.dumps("hello"))) == ackDataErrMsg
    logged = refusals(home, pid) - before
    assert 1 <= logged <= secure.LOG_BURST + 1, logged
    still_serving(system)


# ------------------------------------------------------------------ without a running system


def test_restricted_unpickling_admits_messages_and_refuses_the_rest(tmp_path):
    message = Response("r1", {"ok": [1, 2.5, None, b"x"], "set": {1}, "t": (True,)})
    assert restricted_loads(pickle.dumps(Request("r1", Status()))) == Request("r1", Status())
    assert restricted_loads(pickle.dumps(message)) == message
    assert isinstance(restricted_loads(pickle.dumps(ValueError("bad"))), ValueError)
    marker = tmp_path / "pwned"
    refused = [
        _Touch(marker),  # posix.system: a function
        _Spawn(marker),  # subprocess.Popen: a class outside the allowlist
        eval,  # builtins.eval
        Path,  # pathlib.Path: a class, not one of the allowed value classes
    ]
    for obj in refused:
        with pytest.raises(RefusedFrame):
            restricted_loads(pickle.dumps(obj))
    for module, name in [("cei_actors.runtime.secure", "os"),  # a module attribute
                         ("cei_actors.runtime.secure", "os.system"),  # a dotted path
                         ("cei_actors.runtime.secure", "Path"),
                         ("builtins", "getattr")]:
        data = f"c{module}\n{name}\n.".encode()  # GLOBAL module name: find_class(module, name)
        with pytest.raises(RefusedFrame):
            restricted_loads(data)
    assert not marker.exists()


def test_secret_file_is_private_and_checked(tmp_path):
    path = new_secret_file(tmp_path / "secret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(read_secret(path)) == secure.KEY_BYTES
    assert new_secret_file(path) == path and len(read_secret(path)) == secure.KEY_BYTES
    path.chmod(0o640)
    with pytest.raises(SecretError, match="accessible to others"):
        read_secret(path)
    short = tmp_path / "short"
    short.write_bytes(b"x" * 5)
    short.chmod(0o600)
    with pytest.raises(SecretError, match="5 bytes"):
        read_secret(short)
    with pytest.raises(SecretError, match="cannot read"):
        read_secret(tmp_path / "missing")
    link = tmp_path / "link"
    link.symlink_to(short)
    with pytest.raises(SecretError):
        read_secret(link)


def test_a_local_agent_without_a_secret_file_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != secure.SECRET_ENV}
    out = subprocess.run([sys.executable, "-m", "cei_actors.eeagent", "--node-id", "n1", "--pd", "9",
                          "--state-dir", str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "--secret-file" in out.stderr, out.stderr


def test_a_system_starts_after_an_embedded_temporary_home_is_gone():
    """``CEI()`` with a temporary home names its secret in $CEI_SECRET_FILE and removes it at
    stop; a later ``start_system()`` in the same process gets a fresh secret instead of failing."""
    from cei_actors.embed import CEI
    from cei_actors.runtime.system import shutdown_system, start_system

    with CEI(plan=None) as cei:
        named = Path(os.environ[secure.SECRET_ENV])
        assert named == cei.home / "secret"
    assert not named.exists()
    asys = start_system()
    try:
        assert Path(os.environ[secure.SECRET_ENV]).exists()
        assert global_actors(asys) == {}
    finally:
        shutdown_system(asys)


def test_a_process_that_talks_to_two_systems_keeps_both_keys(tmp_path):
    """A process given a second system's key still reaches (and stops) the first one: each key
    it was given stays in its keyring, and a system still refuses a key it was never given."""
    from cei_actors.runtime.control import Start
    from cei_actors.runtime.system import TCP_BASE, shutdown_system, start_actor, start_system

    systems, pids = [], []
    try:
        for name in ("a", "b"):
            secure.use_secret_file(new_secret_file(tmp_path / f"{name}.secret"))
            asys = start_system(TCP_BASE)
            systems.append(asys)
            actor = start_actor(asys, "cei_actors.runtime.example_actor.ExampleActor",
                                Start(f"memory://{name}{secrets.token_hex(4)}"))
            reply = asys.ask(actor, Request("r1", Status()), 15)
            assert isinstance(reply, Response), reply
            pids.append(reply.reply.value["pid"])
        first = systems[0]
        actor = start_actor(first, "cei_actors.runtime.example_actor.ExampleActor",
                            Start(f"memory://again{secrets.token_hex(4)}"))
        assert isinstance(first.ask(actor, Request("r2", Status()), 15), Response)
        assert secure.read_secret(tmp_path / "a.secret") != secure.read_secret(tmp_path / "b.secret")
    finally:
        for asys in systems:
            shutdown_system(asys)
    assert wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), timeout=20), \
        "an actor of a system outlived its shutdown"


def test_enum_members_pickled_by_global_name_are_admitted():
    """Debian's Python 3.11.2 pickles ``socket.AF_INET`` as the global ``socket.AF_INET`` (3.11.7
    by value): a member of an allowed enum class is admitted, other globals of that module not
    (found by running the demo as a non-root user with Debian's Python)."""
    import socket

    by_name = b"\x80\x04\x8c\x06socket\x94\x8c\x07AF_INET\x94\x93\x94."
    assert restricted_loads(by_name) is socket.AF_INET
    with pytest.raises(RefusedFrame):
        restricted_loads(b"\x80\x04\x8c\x06socket\x94\x8c\x06socket\x94\x93\x94.")
    with pytest.raises(RefusedFrame):  # a member of an enum class outside the allowlist
        restricted_loads(b"\x80\x04\x8c\x06signal\x94\x8c\x07SIGKILL\x94\x93\x94.")
