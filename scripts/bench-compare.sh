#!/usr/bin/env bash
# palisade vs etcd, side by side, in one command (see README "Benchmarks").
#
# Installs what is missing (etcd-server and protobuf-compiler from apt; the
# etcd-client crate's build needs protoc), builds palisade in release mode
# with the etcd backend, and runs `palisade bench compare`, which starts a
# 3-node palisade cluster, a 3-node palisade cluster with 8 data groups and a
# 3-node etcd cluster on loopback and alternates the workload matrix between
# them. Results (table.md, results.json, SVG charts) go to bench-results/ or
# to --out DIR. Extra arguments are passed to `palisade bench compare`
# (e.g. --smoke for a 30-second check, --duration 20s, --rounds 3).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} (apt)…"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

profile=release
[ "${PALISADE_BENCH_DEBUG:-}" = 1 ] && profile=debug
if [ "$profile" = release ]; then
  cargo build --release --locked -p palisade --features etcd
else
  cargo build --locked -p palisade --features etcd
fi
exec "./target/$profile/palisade" bench compare "$@"
