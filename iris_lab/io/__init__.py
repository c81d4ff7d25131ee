"""Readers and writers of observation and result files."""
