"""The snapshot file: symbolic model, container, merge/read/save, signatures, hashes. No GPU."""
