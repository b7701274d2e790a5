#!/usr/bin/env bash
# One command for the benchmark: installs the load tools if they are missing (Debian, as root),
# builds the staybound release binary and the plain tokio proxy it is compared with
# (examples/plain_proxy.rs), and runs benches/bench.py with the arguments given.
#
#   benches/run.sh                      # 5 rounds, results in benches/results/latest.{md,svg,json}
#   benches/run.sh --quick --rounds 1   # smoke run, about a minute
#   benches/run.sh --no-build ...       # use the binary that is already there
#
# Every other argument goes to bench.py (see `python3 benches/bench.py --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

build=1
args=()
for a in "$@"; do
  case "$a" in
    --no-build) build=0 ;;
    --staybound|--staybound=*|--staybound-cmd|--staybound-cmd=*) build=0; args+=("$a") ;;
    *) args+=("$a") ;;
  esac
done

missing=()
for tool in iperf3:iperf3 redis-server:redis-server redis-benchmark:redis-tools haproxy:haproxy \
  valgrind:valgrind strace:strace; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "run.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null \
      || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
  else
    echo "run.sh: missing ${missing[*]} (Debian: apt-get install ${missing[*]}); haproxy, valgrind and strace are optional" >&2
  fi
fi

if ((build)); then
  cargo build --release --locked
  # why: a second command, so the staybound binary is the one `cargo build --release` makes: built together,
  # the example's dev-dependencies would unify their features into staybound's crates.
  cargo build --release --locked --example plain_proxy
fi

exec python3 benches/bench.py "${args[@]}"
