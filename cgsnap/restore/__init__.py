"""File -> runnable graphs in this process (never imports torch or CuPy)."""
