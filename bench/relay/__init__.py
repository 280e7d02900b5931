"""What relaying a token costs each service, coalescing off and on: ``python -m bench.relay``."""
