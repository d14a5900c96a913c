"""Live graph -> model: stream capture, named buffers, pointer classification, recording."""
from . import saving  # noqa: F401  (installs the GPU check of cut kernel images)
