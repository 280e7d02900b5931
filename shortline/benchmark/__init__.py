"""``shortline bench``: policies against the live stack and the simulator, same requests."""
