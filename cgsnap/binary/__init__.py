"""GPU binaries: ELF cubins, fatbin containers, listing, pruning, demangling. No GPU, no driver."""
