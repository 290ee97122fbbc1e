#!/bin/sh
# Every bench's --quick, two at a time (what `make test` runs): usage tools/bench_quick.sh PYTHON BENCH...
#
# Each bench writes to its own log; a line per bench says whether it passed and how long it took,
# and a failed bench's log is printed. The script fails when any bench failed (after all have run).
# Two at a time because a quick bench leaves part of a core idle (process start-up, brokers, I/O):
# on this 2-core machine the 19 quick benches take ~6.5 min this way against ~10.5 min one by one.
# BENCH_JOBS sets how many run at once.
py=$1
shift
logs=$(mktemp -d)
printf '%s\n' "$@" | xargs -P "${BENCH_JOBS:-2}" -I{} sh -c '
  b={}; py=$0; logs=$1
  [ -f "bench/$b.py" ] || exit 0
  s=$(date +%s)
  if "$py" "bench/$b.py" --quick > "$logs/$b.log" 2>&1; then
    echo "== bench/$b.py --quick: ok ($(( $(date +%s) - s )) s)"
  else
    echo "== bench/$b.py --quick: FAILED ($(( $(date +%s) - s )) s)"
    cat "$logs/$b.log"
    touch "$logs/failed"
  fi' "$py" "$logs"
status=0
[ -e "$logs/failed" ] && status=1
rm -rf "$logs"
exit $status
