"""Observation: binder log lines, hook records and engine events made one timeline."""
