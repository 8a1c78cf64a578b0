"""A fake ``libnvidia-ml.so.1`` built from C, for running the real pynvml without a GPU."""
