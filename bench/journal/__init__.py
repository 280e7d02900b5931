"""What the admission journal adds to streaming latency: ``python -m bench.journal``."""
