"""C++/CUDA kernel sources (package data, installed as ztune.csrc); built on first use."""
