#!/usr/bin/env bash
# The cluster figures of tests/load/results/cluster.md: cross-node direct and
# group load with 1, 2 and 3 nodes behind one private Redis and one MariaDB
# database, plus a standalone node (no Redis) as the baseline, each REPEATS
# times, interleaved. Release binaries built with
#   CARGO_TARGET_DIR=/work/target-cluster cargo build --release --features mysql --bins
#
#   OUT=tests/load/results/cluster-$(date +%F).jsonl bash tests/cluster/bench-suite.sh
set -u
cd "$(dirname "$0")/../.."
REPEATS=${REPEATS:-2}
export OUT=${OUT:-/tmp/chat-hub-cluster-bench.jsonl}
DIRECT=(direct --pairs 50 --duration 20)
GROUP=(group --groups 10 --members 50 --duration 20)
for r in $(seq 1 "$REPEATS"); do
  echo "== round $r of $REPEATS ($(uptime))"
  NO_REDIS=1 bash tests/cluster/bench.sh 1 "direct-standalone" "${DIRECT[@]}"
  NO_REDIS=1 bash tests/cluster/bench.sh 1 "group-standalone" "${GROUP[@]}"
  for n in 1 2 3; do
    bash tests/cluster/bench.sh "$n" "direct-$n" "${DIRECT[@]}"
    bash tests/cluster/bench.sh "$n" "group-$n" "${GROUP[@]}"
  done
done
echo "== done ($(uptime)); results in $OUT"
