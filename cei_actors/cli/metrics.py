"""``cei metrics``: scrape the running system's Prometheus endpoint and show what it serves."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import not_up_message
from .output import CliError, Output


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("metrics", help="the system's Prometheus metrics (scraped from its endpoint)",
                       description="Scrape this host's metrics endpoint (its URL is in "
                                   "HOME/system.json) and print the samples; histogram buckets "
                                   "are left out unless --raw. The metric names are in the README.")
    p.add_argument("prefixes", nargs="*", metavar="NAME",
                   help="only metrics whose name starts with one of these (e.g. cei_pd_)")
    p.add_argument("--raw", action="store_true", help="print the exposition text as served")
    p.set_defaults(func=cmd_metrics)


def endpoint(home: Path) -> str:
    """The metrics URL of the system up in ``home``; :class:`CliError` if none."""
    from ..launch.launcher import read_info

    info = read_info(home)
    if info is None:
        raise CliError(not_up_message(home))
    where = info.get("metrics")
    if not where:
        raise CliError(f"the system in {home} serves no metrics (its plan says `metrics: off`)")
    return str(where["url"])


def scrape(url: str, timeout: float = 10.0) -> str:
    """The exposition text served at ``url``; :class:`CliError` naming the URL if it fails."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - our URL
            return response.read().decode("utf-8")
    except urllib.error.URLError as exc:
        raise CliError(f"metrics endpoint {url}: {getattr(exc, 'reason', exc)}") from None
    except OSError as exc:
        raise CliError(f"metrics endpoint {url}: {exc}") from None


def parse(text: str, prefixes: list[str] | None = None) -> list[dict[str, Any]]:
    """The families of an exposition text as plain data: ``[{name, type, help, samples:
    [{name, labels, value}]}]``, only those whose name starts with one of ``prefixes``."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for family in text_string_to_metric_families(text):
        if prefixes and not family.name.startswith(tuple(prefixes)):
            continue
        out.append({
            "name": family.name,
            "type": family.type,
            "help": family.documentation,
            "samples": [{"name": s.name, "labels": dict(s.labels), "value": s.value}
                        for s in family.samples],
        })
    return out


def _line(sample: dict[str, Any]) -> str:
    labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample["labels"].items()))
    value = sample["value"]
    shown = str(int(value)) if float(value).is_integer() else f"{value:.6g}"
    return f"{sample['name']}{{{labels}}} {shown}" if labels else f"{sample['name']} {shown}"


def cmd_metrics(args: argparse.Namespace, out: Output) -> int:
    url = endpoint(Path(args.home))
    text = scrape(url, timeout=getattr(args, "request_timeout", 10.0))
    if args.raw and not out.json:
        print(text, end="", file=out.stream)
        return 0
    families = parse(text, args.prefixes)
    if out.format == "name":  # one metric name a line, as -o name lists ids elsewhere
        out.emit(families, key="name")
        return 0
    if out.json:
        out.emit({"url": url, "metrics": families})
        return 0
    out.line(f"# metrics from {url}")
    for family in families:
        for sample in family["samples"]:
            if not sample["name"].endswith("_bucket"):
                out.line(_line(sample))
    return 0
