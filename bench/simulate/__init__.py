"""Simulated policy comparison, the issue-7 limits, and the simulator's own speed."""
