"""Scenario suites: what to deploy, what to measure, how often, with which deadlines."""
