#!/usr/bin/env bash
# Builds tests/fixtures/v0-3node.tar.gz: the data directories of a 3-node
# cluster (4 data groups) written by palisade BEFORE the cluster map existed
# (commit 0241544: every node a voter of every group, slots dealt `slot % 4`,
# lease ids embedding their group). The upgrade test starts the current
# binary on these directories and checks every key.
#
# Usage: scripts/make-upgrade-fixture.sh PATH_TO_OLD_PALISADE_BINARY
# (build it with `git worktree add /tmp/old 0241544 && cargo build` there).
set -euo pipefail
bin=${1:?path to a palisade binary built from commit 0241544}
root=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$root"' EXIT
peers="1=127.77.77.1:27001,2=127.77.77.2:27001,3=127.77.77.3:27001"
eps="127.77.77.1:27001,127.77.77.2:27001,127.77.77.3:27001"
for i in 1 2 3; do
  "$bin" start --id $i --listen 127.77.77.$i:27001 --peers "$peers" \
    --data-dir "$root/n$i" --groups 4 >"$root/n$i.log" 2>&1 &
done
for _ in $(seq 1 100); do
  "$bin" --help >/dev/null
  if "$bin" cluster status --endpoints "$eps" 2>/dev/null | grep -q leader; then break; fi
  sleep 0.2
done
sleep 2
p() { "$bin" put --endpoints "$eps" "$@" >/dev/null; }
# 300 keys; every third overwritten (history), every tenth deleted.
for i in $(seq 0 299); do p "upgrade/key-$i" "v1-$i"; done
for i in $(seq 0 3 299); do p "upgrade/key-$i" "v2-$i"; done
for i in $(seq 0 10 299); do "$bin" del --endpoints "$eps" "upgrade/key-$i" >/dev/null; done
# A long lease with a key attached (its id embeds its group).
lease=$("$bin" lease grant --endpoints "$eps" --key "{up}lease" 86400000 | grep -o '[0-9]\+' | head -1)
p "{up}attached" "held" --lease "$lease"
{
  echo "{"
  echo "  \"lease\": $lease,"
  echo "  \"keys\": {"
  sep=""
  for i in $(seq 0 299); do
    if [ $((i % 10)) -eq 0 ]; then continue; fi
    if [ $((i % 3)) -eq 0 ]; then v="v2-$i"; else v="v1-$i"; fi
    printf '%s    "upgrade/key-%d": "%s"' "$sep" "$i" "$v"
    sep=$',\n'
  done
  printf '%s    "{up}attached": "held"\n' "$sep"
  echo "  },"
  echo "  \"deleted\": [$(seq -s, 0 10 299 | sed 's/\([0-9]*\)/"upgrade\/key-\1"/g')]"
  echo "}"
} >"$root/expected.json"
"$bin" cluster status --endpoints "$eps" >"$root/status.txt"
kill -TERM $(jobs -p)
wait || true
out=$(cd "$(dirname "$0")/.." && pwd)/tests/fixtures/v0-3node.tar.gz
tar -C "$root" -czf "$out" n1 n2 n3 expected.json status.txt
echo "wrote $out ($(du -h "$out" | cut -f1))"
