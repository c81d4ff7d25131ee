"""Inversion methods: representative profiles, IRIS² look-up, networks."""
