"""Discrete-event simulator: the same SchedulerCore under a virtual clock."""
