"""Where the tests find the project's shared, read-only data (the paper, the spec, the released-layout fixture):
``$TNLLM_SHARED_DIR`` if set, else the ``shared`` folder beside the checkout (``../shared``), where it sits on the
development machines and in CI."""
import os
from pathlib import Path

SHARED = Path(os.environ.get("TNLLM_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
RELEASED_TINY = SHARED / "fixtures" / "released_tiny"
