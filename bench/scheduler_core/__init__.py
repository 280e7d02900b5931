"""Cost of one scheduling decision with a deep queue."""
