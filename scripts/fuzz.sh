#!/usr/bin/env bash
# Fuzz smoke run, for CI: installs cargo-fuzz if it is missing, builds the fuzz targets in fuzz/, then runs
# each for FUZZ_SECONDS (default 60) from its committed seeds (fuzz/seeds/TARGET and, for `config`, the
# shipped config/*.toml; read only) plus the live corpus (fuzz/corpus/TARGET, git-ignored: cache it
# between CI runs to keep what was learned).
# Stable Rust: no sanitizer (`-s none`); a panic or failed assertion is the crash we look for.
#
# Exits 0 when no target crashed; otherwise prints each new artifact (fuzz/artifacts/TARGET/...) with the
# commands to reproduce and minimise it, and exits 1. A unit slower than 10 s counts as a failure too.
# Usage: scripts/fuzz.sh [TARGET...]   (default: every target of `cargo fuzz list`)
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${FUZZ_SECONDS:-60}"
case "$seconds" in '' | *[!0-9]*) echo "FUZZ_SECONDS must be a whole number of seconds, not '$seconds'" >&2; exit 64 ;; esac

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

echo "== building ${targets[*]}"
start=$SECONDS
cargo fuzz build -s none
echo "== built in $((SECONDS - start)) s"

failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    dirs=("corpus/$t")
    [ -d "seeds/$t" ] && dirs+=("seeds/$t")
    if [ "$t" = config ]; then
        # The shipped configs too, so keys added to config/staybound.example.toml are seeds at once.
        shipped=$(mktemp -d)
        cp ../config/*.toml "$shipped/"
        dirs+=("$shipped")
    fi
    opts=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
    case "$t" in
        config) opts+=(-dict=dict/toml.dict) ;;
        *) [ -f "dict/$t.dict" ] && opts+=(-dict="dict/$t.dict") ;;
    esac
    marker=$(mktemp)
    log=$(mktemp)
    echo "== $t: ${seconds} s from ${dirs[*]}"
    start=$SECONDS
    rc=0
    # The hard stop covers loading a large cached corpus and a last slow unit; libFuzzer stops itself first.
    timeout -k 10 "$((seconds * 2 + 120))" \
        cargo fuzz run -s none "$t" "${dirs[@]}" -- "${opts[@]}" >"$log" 2>&1 || rc=$?
    grep -E '^#[0-9]+[[:space:]]+DONE|^Done |^stat::(number_of_executed_units|average_exec_per_sec)' "$log" || true
    new=$(find "artifacts/$t" -type f -newer "$marker" 2>/dev/null || true)
    if [ "$rc" -ne 0 ] || [ -n "$new" ]; then
        echo "!! $t failed (exit $rc) after $((SECONDS - start)) s; libFuzzer's report:" >&2
        if grep -qE 'panicked at|ERROR: libFuzzer|Test unit written' "$log"; then
            grep -A3 'panicked at' "$log" | head -12 >&2 || true
            grep -E 'ERROR: libFuzzer|SUMMARY: libFuzzer|Test unit written|Slowest unit' "$log" >&2 || true
        else
            tail -40 "$log" >&2
        fi
        [ "$rc" -eq 124 ] && echo "!! $t: stopped by the hard time limit" >&2
        for a in $new; do
            echo "!! artifact: fuzz/$a" >&2
            echo "   reproduce: (cd fuzz && cargo fuzz run -s none $t $a)" >&2
            echo "   minimise:  (cd fuzz && cargo fuzz tmin -s none $t $a)" >&2
        done
        failed+=("$t")
    else
        echo "== $t: ok in $((SECONDS - start)) s"
    fi
    rm -f "$marker" "$log"
    [ -n "${shipped:-}" ] && rm -rf "$shipped" && shipped=
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found problems in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzzing: no crash in ${targets[*]}"
