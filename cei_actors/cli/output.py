"""How the ``cei`` command prints: one JSON document with ``--json``, readable tables without."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from ..plaindata import plain


class CliError(Exception):
    """A failure to report as one line on stderr with exit status 1."""

    def __init__(self, message: str, *, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


class Output:
    """Prints results either as JSON (machine) or as text and tables (people)."""

    def __init__(self, json_mode: bool, stream: TextIO | None = None) -> None:
        self.json = json_mode
        self.stream = stream or sys.stdout

    def emit(self, data: Any) -> None:
        """Print a whole result (JSON in JSON mode, indented JSON otherwise)."""
        print(json.dumps(plain(data, as_text=False), indent=None if self.json else 2, sort_keys=True), file=self.stream)

    def line(self, text: str) -> None:
        if not self.json:
            print(text, file=self.stream)

    def table(self, rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
        if self.json:
            self.emit(rows)
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in columns:
            table.add_column(c)
        for row in rows:
            table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
        Console(file=self.stream).print(table)
