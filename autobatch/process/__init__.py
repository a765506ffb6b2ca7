"""Trials in child processes under a real memory budget: the worker, its child, telemetry."""
