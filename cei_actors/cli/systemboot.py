"""``cei system-boot on|off``: the PD's system-boot mode (processes wait until it ends)."""

from __future__ import annotations

import argparse

from .common import check_with, connected, done
from .output import Output


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("system-boot", help="begin (on) or end (off) the PD's system-boot mode")
    p.add_argument("mode", choices=("on", "off"), help="on: processes wait; off: they are dispatched")
    p.set_defaults(func=cmd_system_boot)


def cmd_system_boot(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn, check_with("cei process dump (system_boot)"):
        result = conn.pd.set_system_boot(args.mode == "on")
    done(out, result, f"system boot {args.mode}")
    return 0
