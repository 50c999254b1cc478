"""Deterministic simulation: components' pure cores on virtual time, with faults."""

from .kernel import SimNode, Simulation

__all__ = ["SimNode", "Simulation"]
