"""Moved to simulations/benchmarks/loopback.py (the deploy_load benchmark uses it too); this name
stays for branches written against it."""

from simulations.benchmarks.loopback import Processes, fedtune_cmd, free_port  # noqa: F401
