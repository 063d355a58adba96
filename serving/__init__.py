"""The HTTP feature server and its tiered read path."""
