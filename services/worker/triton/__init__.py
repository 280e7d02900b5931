"""The embedded Triton server and the Python-backend models that run inside it."""
