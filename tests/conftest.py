import os

# Keep each test process to the cores this machine has; gloo ranks spawned by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
