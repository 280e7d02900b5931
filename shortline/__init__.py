"""Shortline: speculative shortest-job-first scheduling for interactive LLM serving."""

__version__ = "0.1.0"
