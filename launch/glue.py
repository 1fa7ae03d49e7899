"""Private fine-tuning of an encoder on a GLUE task (the recipe's ``data.task``), then dev accuracy.

    python launch/glue.py --recipe recipes/glue/minilm_sst2_cpu.yaml [key=value ...]

Without ``--recipe`` it runs that MiniLM SST-2 recipe.

The same training loop, engines and overrides as launch/e2e.py (``--config`` for DeepSpeed,
``--engine ddp|fsdp`` under torchrun).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    main = runpy.run_path(str(Path(__file__).resolve().parent / "e2e.py"))["main"]
    sys.exit(main(default_recipe="recipes/glue/minilm_sst2_cpu.yaml"))
