"""Deploying WorkBinder (or the stand-in) on an engine."""
