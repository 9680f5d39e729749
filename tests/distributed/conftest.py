"""Tests of the sharded margin head on 1 to 4 gloo processes (CPU)."""
