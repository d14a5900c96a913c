"""The one layer over the CUDA driver: driver calls, the native node loop, bulk transfers."""
