"""Front ends: the command line, rendering, replay, the demo, diff, bisect, extract, sanitize."""


class UsageError(Exception):
    """The command line asks for something the file does not have: a graph or node it lacks
    (the CLI exits 2)."""
