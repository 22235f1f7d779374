"""A processor plugin with a bug: importing it raises, as a broken ``--import`` module would."""

raise RuntimeError("a bug in a plugin")
