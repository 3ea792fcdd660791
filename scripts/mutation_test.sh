#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut (not in CI: tens of minutes per module on 2 cores).
#
#   scripts/mutation_test.sh [-r REV] [-n EVERY | -m "NAME..."] [-b] [-o OUT] MODULE...   MODULE: stylegan2/loss, ... or "all"
#
# Each module runs alone, in a scratch copy of REV (default HEAD; `git archive`, so the working tree is never
# touched), against its own test files only (TESTS below), at `nice -n 15` with one thread. -n EVERY runs every
# EVERY-th mutant only (systematic sample of mutmut's mutant list, for modules whose full run takes too long);
# -m runs only the named mutants (mutmut globs, e.g. a survivor list); -b leaves out the tests/test_formulas_*.py
# files (the "before" score of docs/DESIGN.md).
# mutmut maps only src/ to import names, so the copy has lib/ moved to src/; [tool.mutmut] in pyproject.toml
# holds the shared settings, this script adds the module and its tests. Per module, OUT/<module>.txt gets the
# score line, the survivors' diffs and mutmut's results; KEEP=1 keeps the scratch copy.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.venv"
MUTMUT_VERSION=3.8.1
REV=HEAD EVERY=1 OUT="$ROOT/runs/mutation" BEFORE= ONLY=
while getopts "r:n:m:o:b" opt; do
  case $opt in
    r) REV=$OPTARG ;; n) EVERY=$OPTARG ;; m) ONLY=$OPTARG ;; o) OUT=$OPTARG ;; b) BEFORE=1 ;;
    *) sed -n 2,13p "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
REV=$(git -C "$ROOT" rev-parse --short "$REV")  # one commit for the whole run, even if the branch moves meanwhile
[ $# -gt 0 ] || { sed -n 2,13p "$0"; exit 2; }

declare -A TESTS=(
  [stylegan2/loss]="tests/test_gan_augment_loss.py tests/test_formulas_gan.py"
  [stylegan2/augment]="tests/test_gan_augment_loss.py tests/test_formulas_gan.py"
  [stylegan2/networks]="tests/test_gan_networks.py tests/test_gan_augment_loss.py tests/test_formulas_gan.py"
  [datasetgan/ensemble]="tests/test_interpreter_ensemble.py tests/test_formulas_interpreter.py"
  [datasetgan/uncertainty]="tests/test_interpreter_ensemble.py tests/test_formulas_interpreter.py"
  [clamnet/loss]="tests/test_clamnet.py tests/test_formulas_clamnet_metrics_io.py"
  [evaluation/metrics]="tests/test_evaluation.py tests/test_formulas_clamnet_metrics_io.py"
  [io/slices]="tests/test_io.py tests/test_formulas_clamnet_metrics_io.py"
  [io/windowing]="tests/test_io.py tests/test_formulas_clamnet_metrics_io.py"
)
[ "$*" = all ] && set -- stylegan2/loss stylegan2/augment stylegan2/networks datasetgan/ensemble datasetgan/uncertainty \
  clamnet/loss evaluation/metrics io/slices io/windowing

[ -x "$VENV/bin/mutmut" ] || "$VENV/bin/pip" install -q "mutmut==$MUTMUT_VERSION"
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for module in "$@"; do
  [ -n "${TESTS[$module]:-}" ] || { echo "unknown module $module (known: ${!TESTS[*]})" >&2; exit 2; }
  work=$(mktemp -d "${TMPDIR:-/tmp}/labelfactory-mutmut.XXXXXX")
  git -C "$ROOT" archive "$REV" | tar -x -C "$work"
  mv "$work/lib" "$work/src"
  tests=()
  for t in ${TESTS[$module]}; do  # a file REV does not have is left out
    [ -e "$work/$t" ] && ! { [ -n "$BEFORE" ] && [[ $t == tests/test_formulas_* ]]; } && tests+=("\"$t\"")
  done
  selection=$(IFS=,; echo "${tests[*]}")
  # this checkout's [tool.mutmut] (REV may predate it) at the end of the copy's pyproject.toml, plus the module
  {
    awk '/^\[/ { on = ($0 == "[tool.mutmut]") } !on' "$work/pyproject.toml"
    awk '/^\[/ { on = ($0 == "[tool.mutmut]") } on' "$ROOT/pyproject.toml"
    echo "only_mutate = [\"src/labelfactory/$module.py\"]"
    echo "pytest_add_cli_args_test_selection = [$selection]"
  } > "$work/pyproject.new" && mv "$work/pyproject.new" "$work/pyproject.toml"
  report="$OUT/${module//\//-}.txt"
  (
    cd "$work"
    # subprocesses too import the mutated copy, never the checkout (the folder must exist before Python starts)
    mkdir -p mutants/src && export PYTHONPATH="$work/mutants/src"
    mm() { nice -n 15 "$VENV/bin/mutmut" "$@"; }
    names=()
    [ -n "$ONLY" ] && read -r -a names <<< "$ONLY"
    if [ "$EVERY" -gt 1 ]; then  # generate the mutants (a filter matching none stops mutmut there), take every k-th
      mm run "no-such-mutant" > sample.log 2>&1 || true
      mapfile -t names < <(mm results --all true 2>> sample.log | sed -n 's/^ *\([^ ]*__mutmut_[0-9]*\): .*/\1/p' \
        | sort -V | awk -v k="$EVERY" 'NR % k == 1')
      [ ${#names[@]} -gt 0 ] || { echo "no mutants listed for $module (see $work/sample.log)" >&2; exit 1; }
      rm -f mutants/mutmut-stats.json  # that run's stats cover no test: collect them again
    fi
    mm run --max-children 1 "${names[@]}" > run.log 2>&1 || { tail -40 run.log >&2; exit 1; }
    mm results --all true > results.txt 2>&1
    # the mutants this run tried (the others read "not checked")
    grep -E ': (killed|survived|timeout|no tests|suspicious|segfault)' results.txt > states.txt || true
    total=$(wc -l < states.txt)
    killed=$(grep -c -E ': (killed|timeout|segfault)' states.txt || true)
    tried="all mutants"
    [ "$EVERY" -gt 1 ] && tried="every ${EVERY}th mutant"
    [ -n "$ONLY" ] && tried="named mutants"
    {
      echo "$module @ $REV: $killed / $total killed" \
        "($(awk -v k="$killed" -v t="$total" 'BEGIN { printf "%.1f", t ? 100 * k / t : 0 }')%), $tried," \
        "tests: ${selection//\"/}"
      grep -v -E ': (killed|timeout|segfault)' states.txt || true
      for m in $(grep -v -E ': (killed|timeout|segfault)' states.txt | cut -d: -f1); do
        mm show "$m" 2>&1 || echo "(mutmut show failed for $m)"
      done
    } > "$report"
    head -1 "$report"
  )
  [ -n "${KEEP:-}" ] && echo "kept $work" || rm -rf "$work"
done
