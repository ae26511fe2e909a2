"""Numba CPU kernels: one file per op, the backend contract in `backend.py`."""
