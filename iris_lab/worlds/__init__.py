"""Synthetic worlds: seeded generators of model atmospheres for training and validation."""
