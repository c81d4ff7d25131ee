"""Spectral synthesis: LTE (torch) and NLTE (Lightweaver) forward models."""
