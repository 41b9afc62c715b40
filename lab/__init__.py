"""workbinder-lab: stands up WorkBinder on an engine and measures its pool."""

__version__ = "0.1.0"
