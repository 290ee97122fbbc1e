"""Fuzz the decoders of untrusted bytes (issue 15 item 15): executions and unique failures per target.

Targets are those of ``tools/fuzz_targets.py``: update frame, frame header, model frame, chunk +
reassembly, manifest + signature, codec payload, codec spec, DICOM intake (decode, preprocessing,
de-identification, write). Each input is a seeded mutation (1 to 4 of: bit flip, byte set,
truncation, insertion, deletion, duplication, an extreme JSON value) of a corpus entry, or, one
time in ten, arbitrary bytes. The corpus starts from valid inputs and keeps (up to 64) mutants
that still decode, so mutations go on from inputs that get past the first checks: a cheap
stand-in for coverage feedback (atheris, a coverage-guided fuzzer, does not install beside this
Python). A *failure* is any exception that is not a ``FedscanError``; failures are unique by
exception type and the line that raised it. Every row should say 0; the bench exits 1 otherwise
(with the failing inputs in ``meta.failures``).

Full run: ``--seconds`` per target (default 60). ``--quick`` (``make test``): 250 inputs per target
(fewer for DICOM), a fixed count so the run is the same every time.

    nice -n 10 python bench/fuzz.py            # bench/results/fuzz.json
    python bench/fuzz.py --quick               # bench/results/fuzz.quick.json
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
from _common import parser, print_table, write_rows

from tools.fuzz_targets import MUTATIONS, Target, mutate, outcome, targets

QUICK_EXECUTIONS = {"dicom": 80, "frame_header": 120}
"""--quick: inputs per target (default 250); the DICOM intake runs ~60 inputs/s on this machine."""
CORPUS_MAX = 64


def fuzz(target: Target, *, seed: int, seconds: float | None, executions: int | None) -> tuple[dict[str, Any],
                                                                                                list[dict[str, str]]]:
    """Fuzz one target for ``seconds`` or ``executions`` inputs; return its row and its failures."""
    rng = np.random.default_rng([seed, sum(target.name.encode())])
    corpus = list(target.seeds)
    kinds: Counter[str] = Counter()
    reasons: set[str] = set()
    failures: dict[str, dict[str, str]] = {}
    t0 = time.perf_counter()
    n = 0
    while (executions is None or n < executions) and (seconds is None or time.perf_counter() - t0 < seconds):
        if rng.random() < 0.1:
            data = rng.bytes(int(rng.integers(0, 1024)))
        else:
            ops = [(MUTATIONS[int(rng.integers(len(MUTATIONS)))], int(rng.integers(1 << 30)), int(rng.integers(1 << 16)))
                   for _ in range(int(rng.integers(1, 5)))]
            data = mutate(corpus[int(rng.integers(len(corpus)))], ops)
        got = outcome(target, data)
        n += 1
        kinds[got.kind] += 1
        if got.kind == "refused":
            reasons.add(got.detail)
        elif got.kind == "accepted" and len(corpus) < CORPUS_MAX and data not in corpus:
            corpus.append(data)
        elif got.kind == "failed":
            key = got.detail.split(":", 2)[0] + ":" + got.detail.split(":", 2)[1] if got.detail.count(":") >= 2 \
                else got.detail
            failures.setdefault(key, {"target": target.name, "failure": got.detail, "input_hex": data[:256].hex()})
    seconds_run = time.perf_counter() - t0
    row = {"target": target.name, "executions": n, "seconds": round(seconds_run, 2),
           "execs_per_s": round(n / seconds_run, 1) if seconds_run > 0 else 0.0,
           "accepted": kinds["accepted"], "refused": kinds["refused"], "refusal_reasons": len(reasons),
           "corpus": len(corpus), "unique_failures": len(failures)}
    return row, list(failures.values())


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="time per target (full run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", nargs="*", help="only these targets")
    args = p.parse_args()
    warnings.simplefilter("ignore")  # pydicom warns on every damaged element
    rows, failures = [], []
    for name, target in targets().items():
        if args.targets and name not in args.targets:
            continue
        execs = QUICK_EXECUTIONS.get(name, 250) if args.quick else None
        row, found = fuzz(target, seed=args.seed, seconds=None if args.quick else args.seconds, executions=execs)
        rows.append(row)
        failures += found
        print(f"{name}: {row['executions']} inputs, {row['unique_failures']} unique failures", flush=True)
    print_table(rows, ["target", "executions", "execs_per_s", "accepted", "refused", "refusal_reasons",
                       "unique_failures"])
    meta = {"seed": args.seed,  # write_rows adds commit, date, load and --quick
            "seconds_per_target": None if args.quick else args.seconds, "mutations": list(MUTATIONS),
            "failures": failures}
    path = write_rows("fuzz", rows, quick=args.quick, meta=meta)
    print(f"wrote {path}")
    for f in failures:
        print(f"FAILURE {f['target']}: {f['failure']}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
