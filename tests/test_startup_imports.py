"""What a coordinator or agent process loads at start: not the heavy libraries only some jobs use.

``fedscan.compose`` is what ``fedscan coordinator`` and ``fedscan agent`` import. MONAI (augmentation,
the segmentation job), opacus (DP, the segmentation job) and scikit-learn (AUC) are imported on first
use: together they cost ~3 s of CPU per process start, and the multi-process tests and a fleet's
restarts start many processes that never use them.
"""

from __future__ import annotations

import subprocess
import sys

DEFERRED = ("monai", "opacus", "sklearn")


def test_process_start_does_not_import_the_deferred_libraries() -> None:
    code = ("import sys, fedscan.compose; "
            f"print(','.join(m for m in {DEFERRED!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"imported at start: {out.stdout.strip()}"


def test_the_check_sees_a_deferred_library_when_it_is_imported() -> None:
    code = "import sys, fedscan.compose, sklearn.metrics; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "True"
