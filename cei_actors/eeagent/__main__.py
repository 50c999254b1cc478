"""``python -m cei_actors.eeagent``: the EEAgent process a local-cloud "VM" runs.

It joins the running actor system at ``--pd`` as an external endpoint (the recipe of
``runtime.system``), finds the PD leader by its global names (``pd``, or with replicas
``pd.1``, ... whichever answers ``Status`` as the ready leader; re-checked every 2 s and
switched after a failover), says ``Hello("eeagent:<id>")`` and then
serves launch/terminate/cleanup requests and sends heartbeats until SIGTERM/SIGINT. If an actor
named ``--epum-name`` (``epum``) exists, it greets it too and sends it health heartbeats
(``NodeHeartbeat``) on the same interval and in answer to its ``HealthProbe``. On exit
it terminates its processes (the "VM" is going away) unless ``--keep-processes``; a restarted
agent on the same ``--state-dir`` re-adopts processes that are still running.

    python -m cei_actors.eeagent --node-id N --pd [HOST:]PORT[/NAME] --slots 4 --state-dir D
        [--agent-id ID] [--pd-name pd] [--epum-name epum] [--heartbeat 30] [--grace 10]
        [--fence 15] [--keep-processes] [--secret-file F] [--listen ADDR --allow CIDR]

On a VM booted by the Provisioner with ``cei-agent`` contextualization, ``--from-userdata FILE``
(the userdata the VM received, e.g. from the cloud's metadata service) gives the node id, the
PD address, the secret file (by reference) and the engine settings; options given beside it
override what it says (e.g. an explicit ``--pd`` address or ``--state-dir``)::

    python -m cei_actors.eeagent --from-userdata /var/lib/cloud/user-data [--pd ADDR] [...]

Across hosts, give every host's admin (``--pd`` repeated, or ``HOST:PORT,HOST:PORT``; a
``cei-agent`` userdata's ``pd`` may list several the same way): the agent attaches to the
first that answers and looks for the replicas in all of them, so it finds a leader on any
host and keeps working when the host it attached to is lost (decision NH6).

``--node-id`` defaults to ``$CEI_NODE_ID`` (set by the local cloud driver), ``--agent-id`` to
the node id, ``--state-dir`` to ``$CEI_NODE_DIR/eeagent``, ``--secret-file`` (the system's
key, which every message is authenticated with) to ``$CEI_SECRET_FILE``, which the local
driver's agents inherit from the Provisioner's process.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from .actor import MIN_GAP, EndpointAgent
from .lease import DEFAULT_FENCE
from .retention import DEFAULT_OUTPUT_RETENTION


def parse_pd(value: str) -> list[tuple[str, str | None]]:
    """``PORT``, ``HOST:PORT`` or either with ``/NAME``, or several joined by commas: per
    admin, (the admin as ``PORT`` or ``HOST:PORT``, name or None). A bare port is the admin on
    this host's address."""
    parts = [part.strip() for part in value.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"--pd {value!r}: expected [HOST:]PORT[/NAME][,...]")
    return [_parse_one_pd(part) for part in parts]


def _parse_one_pd(value: str) -> tuple[str, str | None]:
    from ..runtime.network import NetworkError, split_host_port

    name = None
    if "/" in value:
        value, name = value.split("/", 1)
    try:
        host, port = split_host_port(value, default_host="-")
    except NetworkError:
        raise argparse.ArgumentTypeError(f"--pd {value!r}: expected PORT or HOST:PORT[/NAME]") from None
    return (str(port) if host == "-" else f"{host}:{port}"), (name or None)


def parse_retention(value: str) -> float | None:
    """``--output-retention``: seconds >= 0, or ``forever``."""
    if value.strip().lower() == "forever":
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"--output-retention {value!r}: expected seconds >= 0 or 'forever'")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cei_actors.eeagent", description=__doc__.split("\n")[0])
    p.add_argument("--node-id", default=os.environ.get("CEI_NODE_ID"))
    p.add_argument("--agent-id", default=None)
    p.add_argument("--pd", required=True, type=parse_pd, action="append",
                   help="[HOST:]ADMIN_PORT[/NAME]; repeat (or join with commas) for every host's admin")
    p.add_argument("--listen", default=None,
                   help="this host's address to listen on (default $CEI_LISTEN, else 127.0.0.1)")
    p.add_argument("--advertise", default=None, help="the address peers reach it at (default: --listen)")
    p.add_argument("--allow", action="append", default=None, metavar="CIDR",
                   help="peer network allowed to connect (repeat; default $CEI_ALLOW; required off loopback)")
    p.add_argument("--pd-name", default=None, help="the PD's global actor name (default pd)")
    p.add_argument("--epum-name", default="epum", help="EPUM's global actor name ('' = none)")
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--state-dir", default=None)
    p.add_argument("--heartbeat", type=float, default=30.0, help="heartbeat interval, seconds")
    p.add_argument("--heartbeat-gap", type=float, default=MIN_GAP,
                   help="least seconds between heartbeats sent for changes (a burst shares one)")
    p.add_argument("--grace", type=float, default=10.0, help="SIGTERM to SIGKILL, seconds")
    p.add_argument("--fence", type=float, default=DEFAULT_FENCE,
                   help="seconds without a lease from the PD after which the agent stops its "
                        "processes, until the PD's first grant names its own (decision PD9)")
    p.add_argument("--keep-processes", action="store_true", help="leave processes running on exit")
    p.add_argument("--output-retention", type=parse_retention, default=DEFAULT_OUTPUT_RETENTION,
                   help="seconds a cleaned-up process's output files are kept ('forever': never removed)")
    p.add_argument("--secret-file", default=os.environ.get("CEI_SECRET_FILE"),
                   help="the actor system's secret file (default $CEI_SECRET_FILE, set by the local driver)")
    p.add_argument("--attach-timeout", type=float, default=30.0)
    p.add_argument("--log-level", default=os.environ.get("CEI_LOG_LEVEL", "INFO"))
    p.add_argument("--from-userdata", metavar="FILE", default=None,
                   help="start as the cei-agent userdata in FILE says (other options override it)")
    return p


def expand_userdata(argv: list[str]) -> list[str]:
    """``argv`` with the options of its ``--from-userdata FILE`` put first (so that the
    options given override them). Raises ``ValueError`` with a one-line reason."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--from-userdata", default=None)
    pre.add_argument("--pd", action="append", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.from_userdata is None:
        return argv
    from ..provisioner.contextualization import agent_args, parse_userdata

    try:
        with open(known.from_userdata, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ValueError(f"--from-userdata {known.from_userdata}: {exc.strerror or exc}") from None
    implied = agent_args(parse_userdata(raw))
    if known.pd:  # the admins given replace the userdata's (--pd is repeatable, not a value)
        implied = [a for k, a in enumerate(implied)
                   if a != "--pd" and (k == 0 or implied[k - 1] != "--pd")]
    return [*implied, *argv]


def main(argv: list[str] | None = None) -> int:
    try:
        argv = expand_userdata(list(sys.argv[1:] if argv is None else argv))
    except ValueError as exc:
        print(f"eeagent: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s eeagent %(levelname)s %(message)s",
    )
    log = logging.getLogger("cei_actors.eeagent")
    if not args.node_id:
        print("eeagent: --node-id is required (or set CEI_NODE_ID)", file=sys.stderr)
        return 2
    state_dir = args.state_dir
    if state_dir is None:
        node_dir = os.environ.get("CEI_NODE_DIR")
        if not node_dir:
            print("eeagent: --state-dir is required (or set CEI_NODE_DIR)", file=sys.stderr)
            return 2
        state_dir = os.path.join(node_dir, "eeagent")
    if args.slots < 0 or args.heartbeat <= 0 or args.grace < 0 or not args.fence > 0:
        print("eeagent: --slots >= 0, --heartbeat > 0, --grace >= 0 and --fence > 0 please",
              file=sys.stderr)
        return 2
    if not args.secret_file:
        print("eeagent: --secret-file is required (or set CEI_SECRET_FILE)", file=sys.stderr)
        return 2
    admins = [admin for group in args.pd for admin in group]
    pd_name = args.pd_name or next((name for _, name in admins if name), None) or "pd"

    stop = {"flag": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    from ..runtime.network import Network, NetworkError, use_network
    from ..runtime.secure import SecretError
    from ..runtime.system import SystemNotRunning, admin_address, attach_system, detach_system

    try:
        if args.listen or args.advertise or args.allow:
            env = Network.from_env()
            use_network(Network.build(args.listen or env.listen, args.advertise,
                                      args.allow if args.allow is not None else env.allow))
        else:
            use_network(Network.from_env())
    except NetworkError as exc:
        print(f"eeagent: {exc}", file=sys.stderr)
        return 2

    deadline = time.monotonic() + args.attach_timeout
    asys, asys_label = None, ""
    while asys is None:
        for port, _ in admins:  # the first that answers
            try:
                asys, asys_label = attach_system(port, secret_file=args.secret_file), port
                break
            except SecretError as exc:
                print(f"eeagent: {exc}", file=sys.stderr)
                return 2
            except SystemNotRunning as exc:
                failure = exc
        else:
            if time.monotonic() > deadline or stop["flag"]:
                print(f"eeagent: {failure}", file=sys.stderr)
                return 1
            time.sleep(0.2)
    # with several admins, each is asked for the replicas (by address: a bare port is ours)
    others = [(port, admin_address(port if ":" in port else f"{asys.cei_admin_host}:{port}"))
              for port, _ in admins] if len(admins) > 1 else []
    try:
        agent = EndpointAgent(
            asys,
            agent_id=args.agent_id or args.node_id,
            node_id=args.node_id,
            slots=args.slots,
            state_dir=state_dir,
            pd_name=pd_name,
            epum_name=args.epum_name or None,
            heartbeat_interval=args.heartbeat,
            grace=args.grace,
            min_gap=args.heartbeat_gap,
            output_retention=args.output_retention,
            fence=args.fence,
            admins=others,
        )
    except Exception as exc:
        print(f"eeagent: cannot start: {exc}", file=sys.stderr)
        detach_system(asys)
        return 1
    log.info("agent %s on node %s: %d slots, state in %s; attached to %s", agent.agent_id,
             args.node_id, args.slots, state_dir, asys_label)
    try:
        while not stop["flag"]:
            try:
                agent.step(max_wait=0.5)
            except Exception:
                log.exception("loop error")
                time.sleep(0.1)
    finally:
        agent.close(kill=not args.keep_processes, grace=min(args.grace, 5.0))
        detach_system(asys)
    return 0


if __name__ == "__main__":
    sys.exit(main())
