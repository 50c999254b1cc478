"""A small PD system for actor tests: a TCP actor system, the PD actor, EEAgent processes.

Agents are real ``python -m cei_actors.eeagent`` processes in their own sessions ("VMs");
:meth:`PDSystem.kill_node` kills one like a crashing VM (the agent and every process it ran).
Nodes are announced to the PD by hand (``static_resources``), as EPUM would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

from thespian.actors import ActorTypeDispatcher

from cei_actors.epum.messages import NodeState
from cei_actors.pd.actor import ProcessDispatcherActor
from cei_actors.pd.client import PDClient
from cei_actors.runtime.control import Request, Response, Start, Started, Status
from cei_actors.runtime.messages import ErrorReply, Ok
from cei_actors.runtime.system import shutdown_system, start_system

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CallError(RuntimeError):
    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(f"{reply.code}: {reply.message}")
        self.reply = reply


class AskService:
    """``call``/``tell`` over a thespian system handle (what PDClient needs)."""

    def __init__(self, asys: Any, address: Any) -> None:
        self.asys = asys
        self.address = address

    def call(self, message: Any, timeout: float | None = None) -> Any:
        rid = uuid.uuid4().hex
        reply = self.asys.ask(self.address, Request(rid, message), timeout or 10.0)
        if not isinstance(reply, Response) or reply.rid != rid:
            raise TimeoutError(f"no reply to {type(message).__name__}: {reply!r}")
        if isinstance(reply.reply, ErrorReply):
            raise CallError(reply.reply)
        assert isinstance(reply.reply, Ok), reply.reply
        return reply.reply.value

    def tell(self, message: Any) -> None:
        self.asys.tell(self.address, message)


def pd_config(monitor: bool = False, slots: int = 2, **over: Any) -> dict[str, Any]:
    """A test config; ``monitor`` turns on the resource monitor (0.3 s beats, 1.5/3 s limits)."""
    engine: dict[str, Any] = {"slots": slots, "heartbeat_period": 0.3}
    if monitor:
        engine.update(heartbeat_warning=1.5, heartbeat_missing=3.0)
    conf: dict[str, Any] = {
        "engines": {"e1": engine},
        "static_resources": True,
        "restart_throttling_config": {"minimum_time_between_starts": 0.2},
        "dispatch_retry_seconds": 2.0,
    }
    conf.update(over)
    return conf


class PDSystem:
    def __init__(self, log_url: str, workdir: str, config: dict[str, Any] | None = None) -> None:
        self.log_url = log_url
        self.workdir = workdir
        self.config = config or pd_config()
        self.asys = start_system()
        self.port = self.asys.cei_admin_port
        self.agents: dict[str, subprocess.Popen] = {}
        self.pd: Any = None
        self.client: PDClient | None = None
        self.start_pd()

    def start_pd(self) -> None:
        self.pd = self.asys.createActor(ProcessDispatcherActor, globalName="pd")
        # a short ZooKeeper session: a kill -9'd leader's election node goes away sooner
        leadership = f"{self.log_url}?timeout=3" if self.log_url.startswith("zk://") else "auto"
        started = self.asys.ask(self.pd, Start(self.log_url, config=self.config, leadership=leadership), 30)
        assert isinstance(started, Started), started
        self.client = PDClient(AskService(self.asys, self.pd), timeout=10.0)

    def pd_pid(self) -> int:
        status = self.asys.ask(self.pd, Status(), 10)
        return int(status.value["pid"])

    def kill_pd(self) -> None:
        os.kill(self.pd_pid(), signal.SIGKILL)
        from cei_actors.runtime.system import lookup

        deadline = time.monotonic() + 10
        while lookup(self.asys, "pd") is not None:
            assert time.monotonic() < deadline, "the admin did not notice the PD's death"
            time.sleep(0.05)

    def state_dir(self, node_id: str) -> str:
        return os.path.join(self.workdir, node_id)

    def add_node(
        self, node_id: str, slots: int = 2, heartbeat: float = 0.3, announce: bool = True, **props: Any
    ) -> None:
        log = open(os.path.join(self.workdir, f"{node_id}.log"), "ab")  # noqa: SIM115
        self.agents[node_id] = subprocess.Popen(
            [
                sys.executable, "-m", "cei_actors.eeagent", "--node-id", node_id,
                "--pd", f"127.0.0.1:{self.port}", "--slots", str(slots),
                "--state-dir", self.state_dir(node_id), "--heartbeat", str(heartbeat),
                "--grace", "1",
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if announce:
            self.announce(node_id, **props)

    def announce(self, node_id: str, state: str = "RUNNING", **props: Any) -> None:
        assert self.client is not None
        self.client.service.call(NodeState(node_id, "pd_domain_e1", state, dict(props)))

    def agent_table(self, node_id: str) -> list[dict[str, Any]]:
        from cei_actors.eeagent.supervisor import read_table  # table + journal (EA3)

        try:
            doc = read_table(self.state_dir(node_id))
        except (OSError, ValueError):
            return []
        return doc["processes"] if doc else []

    def live_copies(self) -> dict[tuple[str, int], list[str]]:
        """(upid, round) -> nodes whose agent table shows it live and whose pid is alive."""
        out: dict[tuple[str, int], list[str]] = {}
        for node_id in self.agents:
            for p in self.agent_table(node_id):
                if p["state"] in ("PENDING", "RUNNING", "TERMINATING") and p.get("pid") and _alive(p["pid"]):
                    out.setdefault((p["upid"], p["round"]), []).append(node_id)
        return out

    def kill_node(self, node_id: str) -> None:
        """The VM dies: SIGKILL the agent and every process group it started."""
        proc = self.agents[node_id]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for p in self.agent_table(node_id):
            if p.get("pid"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p["pid"], signal.SIGKILL)

    def close(self) -> None:
        for proc in self.agents.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for node_id, proc in self.agents.items():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            for p in self.agent_table(node_id):
                if p.get("pid"):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p["pid"], signal.SIGKILL)
        shutdown_system(self.asys)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


class FakePD(ActorTypeDispatcher):
    """Stands in for the PD in agent tests: records Hellos and heartbeats, forwards on request.

    ``("send", peer_name, message)`` sends ``message`` to that peer; ``"dump"`` answers with
    ``(hellos, heartbeats)`` where each heartbeat is ``(received_at, AgentHeartbeat)``;
    ``("peer", name)`` with the address of that peer (None if unknown).
    """

    def __init__(self) -> None:
        super().__init__()
        self.peers: dict[str, Any] = {}
        self.hellos: list[str] = []
        self.heartbeats: list[tuple[float, Any]] = []

    def receiveMessage(self, msg: Any, sender: Any) -> None:  # noqa: N802
        from cei_actors.eeagent.messages import AgentHeartbeat
        from cei_actors.runtime.control import Hello

        if isinstance(msg, Hello):
            self.peers[msg.name] = sender
            self.hellos.append(msg.name)
            self.send(sender, Ok(msg.name))
        elif isinstance(msg, AgentHeartbeat):
            self.heartbeats.append((time.time(), msg))
        elif isinstance(msg, tuple) and msg and msg[0] == "send":
            self.send(self.peers[msg[1]], msg[2])
        elif isinstance(msg, tuple) and msg and msg[0] == "peer":
            self.send(sender, self.peers.get(msg[1]))
        elif msg == "dump":
            self.send(sender, (list(self.hellos), list(self.heartbeats)))
        elif msg == "pid":
            self.send(sender, os.getpid())

