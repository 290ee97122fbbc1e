"""The default recipe, unchanged, on the fixed 500-image PneumoniaMNIST subset (``bench/defaults.py``'s second half).

The same arms, targets and report as ``bench/defaults.py`` (see its doc), on the subset only, into
``bench/results/defaults_subset.json``: the two training sets in one process took 21.7 min at the 60-round
budget, over the 20 minutes a bench may take here, so ``make bench`` runs them as two benches.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from defaults import main

if __name__ == "__main__":
    main(("pneumoniamnist_500",), "defaults_subset")
