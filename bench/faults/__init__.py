"""The fault benchmark: ``python -m bench.faults`` (scenarios in ``__main__``)."""
