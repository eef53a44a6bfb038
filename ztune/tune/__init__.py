"""The autotuner: search space (space.py), pruning and ranking by the cost model (rank.py), trials as
local torchrun groups (bench.py, worker.py), calibration (calibrate.py), the journal (journal.py),
confirmation of the leaders on medians (confirm.py) and the loop that ties them together (tuner.py).
Nothing here imports torch; trials do, in their own processes.
"""
