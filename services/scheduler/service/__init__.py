"""The scheduler service: the gRPC shell around the pure core.

- ``servicer.py``: translates protobuf and delegates to the data plane (``validation.py``
  checks requests);
- ``dataplane.py``: admission, dispatch, cancellation and the timers, around one
  :class:`~services.scheduler.core.scheduler.SchedulerCore`;
- ``streams.py``: a request's record, its client streams (replay then live) and the
  disconnect grace;
- ``workers.py``: the worker pool (handles, runs, stops, heartbeat expiry);
- ``prediction.py``: the predictor client and its fallback;
- ``results.py``: how a request ends (GenerateResult, metrics, outcome log) and the
  finished results kept for retried ids;
- ``server.py``: the gRPC server with health and reflection, and ``serve()``;
- ``clock.py``: the monotonic clock the core is given.
"""
