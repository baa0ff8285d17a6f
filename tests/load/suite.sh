#!/usr/bin/env bash
# The measurements of docs/PERFORMANCE.md for one backend, in order; each is
# one tests/load/bench.sh run against a fresh server. Results are appended to
# $OUT (default /tmp/chat-hub-bench.jsonl).
#   tests/load/suite.sh sqlite|mysql [soak-seconds]   (0: no soak)
set -u
cd "$(dirname "$0")/../.."
b=${1:?sqlite or mysql}
soak=${2:-180}
B=tests/load/bench.sh
$B "$b" direct-50 direct --pairs 50 --duration 20
$B "$b" latency-1000 direct --pairs 50 --rate 1000 --duration 30
$B "$b" group-10x50 group --groups 10 --members 50 --duration 20
$B "$b" backlog-10000 backlog --backlog 10000 --repeats 3
$B "$b" connections-19900 connections --connections 19900 --hold 15 --connect-concurrency 500
for p in 100 200 400; do
  $B "$b" "scale-direct-$p" direct --pairs "$p" --duration 15
done
[ "$soak" -gt 0 ] && $B "$b" "soak-2000-${soak}s" soak --pairs 50 --rate 2000 --duration "$soak" --churn 2 --sample-secs 10
