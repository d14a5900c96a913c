"""Front ends: the command line, rendering, replay, the demo."""
