"""Inversions: batched Levenberg–Marquardt and coupled (per-pixel + global) fits."""
