"""torchrun entry point for the DeepSpeed example scripts: `run_script.py SCRIPT ARGS...` runs SCRIPT as
__main__ with ARGS; when SCRIPT imports DeepSpeed itself, DeepSpeed is first imported the test-safe way
(tests/helpers/deepspeed_ref.py: CPU accelerator, no shared-memory op build)."""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `tests.helpers`

if __name__ == "__main__":
    script = sys.argv[1]
    if "\nimport deepspeed\n" in Path(script).read_text():
        from tests.helpers.deepspeed_ref import import_deepspeed

        import_deepspeed()
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
