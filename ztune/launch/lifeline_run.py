"""`python -m ztune.launch.lifeline_run SIG PROGRAM ARGS...`: the lifeline wrapper as a program.

A module of its own because `ztune.launch` imports `lifeline` while loading the package: running that module
with `-m` would execute it a second time as __main__, and runpy warns about it in every rank's log.
"""

import sys

from ztune.launch.lifeline import main

if __name__ == "__main__":
    sys.exit(main())
