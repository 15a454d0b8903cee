#!/usr/bin/env bash
# Runs every fuzz target for a short, fixed time over its seed corpus (fuzz/corpus/<target>)
# and its regressions (fuzz/regressions/<target>: inputs that once crashed a target, kept so
# they are replayed on every run). New corpus entries go to a temp dir: the repository stays
# clean. A crash fails the run and leaves its input under fuzz/artifacts/<target>/.
#
#   fuzz/run.sh            every target, FUZZ_SECONDS (default 20) each
#   fuzz/run.sh config     one target
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`); libFuzzer needs nightly features, which
# RUSTC_BOOTSTRAP=1 enables on the stable toolchain.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

seconds=${FUZZ_SECONDS:-20}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^seg-fuzz$')
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in "${targets[@]}"; do
    mkdir -p "$scratch/$target" "regressions/$target"
    start=$(date +%s)
    cargo fuzz run -O "$target" "$scratch/$target" "corpus/$target" "regressions/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 2>"$scratch/$target.log" || {
        tail -40 "$scratch/$target.log"
        echo "fuzz: $target FAILED (input under fuzz/artifacts/$target/)"
        exit 1
    }
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$scratch/$target.log")
    echo "fuzz: $target ok, ${runs:-?} inputs in $(($(date +%s) - start)) s"
done
