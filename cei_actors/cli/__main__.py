"""``python -m cei_actors.cli``: the ``cei`` command."""

from . import entry

entry()
