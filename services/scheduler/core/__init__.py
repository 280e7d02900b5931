"""The scheduling core: plain Python, no gRPC, no wall clock.

The gRPC service and the discrete-event simulator both drive
:class:`~services.scheduler.core.scheduler.SchedulerCore` through the same
methods, so a policy is written once and is both served and simulated.
"""
