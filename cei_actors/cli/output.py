"""How the ``cei`` command prints: JSON or YAML (machine), ids only (``-o name``), or tables
for people (``-o wide``: more columns). Tables never cut a cell: piped, they are plain aligned
text; on a terminal, rich folds long cells instead of eliding them. Times read as
``2026-12-03 06:10:12Z (3m ago)`` (UTC, as the log tools show event times) for people and stay
raw numbers in JSON/YAML."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from ..plaindata import plain

#: The output formats of ``-o``.
FORMATS = ("json", "yaml", "wide", "name")

#: Keys an entity's id is found under, in this order (``-o name``).
ID_KEYS = ("upid", "node_id", "domain_id", "name", "definition_id", "stream", "scenario", "resource_id")


class CliError(Exception):
    """A failure to report as one line on stderr with exit status 1."""

    def __init__(self, message: str, *, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


def age(seconds: float) -> str:
    """A duration as people read it in a table: ``45s``, ``3m``, ``3m20s``, ``2h5m``, ``3d4h``."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 600:
        return f"{s // 60}m{s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60}m" if (s % 3600) // 60 else f"{s // 3600}h"
    return f"{s // 86400}d{(s % 86400) // 3600}h" if (s % 86400) // 3600 else f"{s // 86400}d"


def human_time(ts: float, now: float | None = None) -> str:
    """An epoch time as ``2026-12-03 06:10:12Z (3m ago)`` (UTC, ``in 3m`` if ahead): the clock
    and form of the log tools' times (``cei log show``), which ``--at`` takes back."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))
    delta = now - ts
    return f"{stamp} ({age(delta)} ago)" if delta >= 0 else f"{stamp} (in {age(-delta)})"


_TIME_SUFFIXES = ("_time", "_at", "timestamp", "since", "heartbeat", "deadline", "_until", "_start")


def is_time(key: str, value: Any) -> bool:
    """Whether ``key: value`` is an epoch time (a time-like key holding a plausible epoch number)."""
    return (isinstance(value, int | float) and not isinstance(value, bool) and 1e9 < value < 1e11
            and (key in ("time", "at", "until") or key.endswith(_TIME_SUFFIXES)))


def humanized(data: Any, now: float | None = None, key: str = "") -> Any:
    """``data`` with every epoch time (see :func:`is_time`) as :func:`human_time` text."""
    now = time.time() if now is None else now
    if isinstance(data, dict):
        return {k: humanized(v, now, str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [humanized(v, now, key) for v in data]
    return human_time(data, now) if is_time(key, data) else data


def name_of(item: Any, key: str | None = None) -> str:
    """The id of one entity (``-o name``): ``item[key]``, else its first :data:`ID_KEYS` key."""
    if isinstance(item, dict):
        for k in (key, *ID_KEYS):
            if k is not None and item.get(k) is not None:
                return str(item[k])
        raise CliError("-o name: this command's result has no id to print (use -o json)")
    return str(item)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    text = str(value)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Output:
    """Prints results as JSON, YAML, ids or tables; ``json`` is true for every machine format
    (json, yaml, name), in which commands give their data to :meth:`emit`."""

    def __init__(self, fmt: bool | str | None = None, stream: TextIO | None = None, *,
                 headers: bool = True, tty: bool | None = None) -> None:
        self.format = "json" if fmt is True else (fmt or "table")
        if self.format not in (*FORMATS, "table"):
            raise ValueError(f"unknown output format {fmt!r}")
        self.json = self.format in ("json", "yaml", "name")
        self.wide = self.format == "wide"
        self.headers = headers
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty

    def emit(self, data: Any, key: str | None = None) -> None:
        """Print a whole result: JSON, YAML, its ids (``-o name``), or indented JSON for people."""
        data = plain(data, as_text=False)
        if self.format == "name":
            for item in data if isinstance(data, list) else [data]:
                print(name_of(item, key), file=self.stream)
        elif self.format == "yaml":
            import yaml

            print(yaml.safe_dump(data, sort_keys=True, default_flow_style=False, allow_unicode=True),
                  end="", file=self.stream)
        else:
            print(json.dumps(data, indent=None if self.json else 2, sort_keys=True), file=self.stream)

    def line(self, text: str) -> None:
        if not self.json:
            print(text, file=self.stream)

    def describe(self, data: Any, title: str | None = None) -> None:
        """One entity in full: the data in a machine format, else ``key: value`` lines (YAML)
        with times made human."""
        if self.json:
            self.emit(data)
            return
        import yaml

        if title and self.headers:
            print(title, file=self.stream)
        text = yaml.safe_dump(humanized(plain(data, as_text=False)), sort_keys=False,
                              default_flow_style=False, allow_unicode=True, width=10**6)
        print(text, end="", file=self.stream)

    def table(self, rows: list[dict[str, Any]], columns: list[str], title: str | None = None, *,
              wide: list[str] | None = None, key: str | None = None) -> None:
        """``rows`` as a table of ``columns`` (plus ``wide`` with ``-o wide``); the rows
        themselves in a machine format (``-o name``: the ``key`` column, default the first)."""
        if self.json:
            self.emit(rows, key=key or columns[0])
            return
        if self.wide and wide:
            columns = [*columns, *(c for c in wide if c not in columns)]
        now = time.time()
        cells = [[_cell(humanized(row.get(c), now, c)) for c in columns] for row in rows]
        if not self.tty:
            self._plain_table(cells, columns, title)
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title if self.headers else None, show_header=self.headers)
        for c in columns:
            table.add_column(c, overflow="fold")
        for line in cells:
            table.add_row(*line)
        Console(file=self.stream).print(table)

    def _plain_table(self, cells: list[list[str]], columns: list[str], title: str | None) -> None:
        """Aligned text, every cell whole (``kubectl get`` when piped)."""
        lines = ([columns] if self.headers else []) + cells
        if not lines:
            return
        widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
        if title and self.headers:
            print(title, file=self.stream)
        for line in lines:
            print("   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip(), file=self.stream)


def on_terminal(out: Output) -> bool:
    """Whether to show progress: people's output (not a machine format) and stderr a terminal."""
    return not out.json and sys.stderr.isatty()


@contextlib.contextmanager
def progress(out: Output, title: str, steps: bool = False) -> Iterator[Callable[[str], None]]:
    """A progress callback: on a terminal, a spinner with the time elapsed (on stderr) and
    each step logged above it; silent with a machine format or when stderr is not a terminal,
    but for ``steps`` (a narrative worth keeping, e.g. ``up``'s), then printed as plain lines."""
    if not on_terminal(out):
        yield (lambda line: out.line(line)) if steps else (lambda _line: None)
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(file=sys.stderr, log_path=False)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(f"{title} ...", total=None)

        def say(line: str) -> None:
            bar.update(task, description=f"{title}: {line}")
            console.log(line)

        yield say
