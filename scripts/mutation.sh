#!/usr/bin/env bash
# Mutation testing with mutmut 3.8.1 (installed if missing), one source file at a time, each against only the test
# files that exercise it (mutmut then runs, per mutant, only the tests of those that cover the mutated function).
# On the shared 2-core machine run it as `nice -n 19 scripts/mutation.sh ...`.
#
#   scripts/mutation.sh                               # the glue files in the order below (see TESTS_FOR)
#   scripts/mutation.sh tapo/evaluation/metrics.py    # one file
#   MUTATION_SAMPLE=0.15 MUTATION_SEED=0 scripts/mutation.sh tapo/trainer.py
#       # a seeded stratified sample: that fraction of each function's mutants (at least 2), drawn by function name and
#       # seed only, for a file whose every mutant would take too long (report it as a sample, with its interval)
#
# Each file is mutated in a scratch copy of the checkout (MUTATION_DIR, default /tmp/tapo-mutation/<file>), never in
# the working tree. Per file it prints killed / survived / other counts and the survivors' names; read a survivor
# with `cd <scratch> && python3 -m mutmut show <name>`. Judge each survivor: equivalent (no behaviour changes) or a
# missing test.
set -euo pipefail

# mutmut forks a worker per mutant from a process that already ran torch: with a multi-threaded OpenMP pool the forked
# child spins forever in the first torch op (every mutant then "times out"). One thread per worker avoids that.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

REPO=$(cd "$(dirname "$0")/.." && pwd)
SCRATCH_ROOT=${MUTATION_DIR:-/tmp/tapo-mutation}
JOBS=${MUTATION_JOBS:-2}

python3 -c 'import mutmut' 2>/dev/null || python3 -m pip install --quiet mutmut==3.8.1

# Source file -> the test files that exercise it (space separated). Tests that only reach a file through a subprocess
# (the CLI / SIGKILL tests) are left out: mutmut cannot see their coverage, so they would only slow the first pass.
declare -A TESTS_FOR=(
  [tapo/construct.py]="tests/test_construct.py tests/test_trainer_wiring.py tests/test_trainer.py"
  [tapo/opsd.py]="tests/test_opsd.py"
  [tapo/trainer.py]="tests/test_trainer.py tests/test_trainer_wiring.py tests/test_construction_path.py tests/test_trl_parity.py tests/test_reliability.py tests/test_microbatch.py tests/test_construct.py tests/test_opsd.py tests/test_modelcard.py tests/test_memory.py"
  [tapo/trainer_base.py]="tests/test_reliability.py tests/test_trainer_wiring.py tests/test_trainer.py tests/test_construction_path.py tests/test_trl_parity.py tests/test_microbatch.py tests/test_opsd.py tests/test_modelcard.py tests/test_memory.py"
  [tapo/evaluation/metrics.py]="tests/test_eval_metrics.py tests/test_eval_run.py"
)

# A test that runs `tapo train` in a child process: under mutmut the child imports the mutated tree and fails looking
# for mutmut's settings, and mutmut cannot see what it covers anyway.
SUBPROCESS_TEST=tests/test_reliability.py::test_sigkill_then_resume_matches_an_uninterrupted_run_exactly

files=("$@")
[ ${#files[@]} -eq 0 ] && files=(tapo/construct.py tapo/opsd.py tapo/trainer.py tapo/trainer_base.py tapo/evaluation/metrics.py)

for file in "${files[@]}"; do
  tests=${TESTS_FOR[$file]:-}
  [ -n "$tests" ] || { echo "mutation.sh: no test files listed for $file (add it to TESTS_FOR)" >&2; exit 2; }
  scratch="$SCRATCH_ROOT/${file//\//_}"
  rm -rf "$scratch" && mkdir -p "$scratch"
  # The checkout as git sees it (tracked + untracked, not ignored), without .git and build outputs.
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$scratch")
  test_list=$(printf '"%s", ' $tests)
  # mutmut reads its settings from setup.cfg / pyproject.toml; the scratch copy gets its own.
  cat >> "$scratch/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["tapo"]
only_mutate = ["$file"]
pytest_add_cli_args_test_selection = [${test_list%, }]
also_copy = ["tests"]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x", "--deselect", "$SUBPROCESS_TEST"]
EOF
  echo "== $file  (tests: $tests)"
  names=()
  if [ -n "${MUTATION_SAMPLE:-}" ]; then
    # Generate every mutant and record which tests cover which function, then stop: the name matches no mutant, which
    # mutmut reports only after those steps. The mutant names are then known, and the sample is drawn from them.
    (cd "$scratch" && PYTHONPATH="$scratch" python3 -m mutmut run "no-such-mutant" >"$scratch/generate.log" 2>&1) || true
    (cd "$scratch" && python3 -m mutmut results --all true) | python3 -c '
import collections, math, random, sys
fraction, seed = float(sys.argv[1]), sys.argv[2]
by_function = collections.defaultdict(list)
for line in sys.stdin:
    name = line.split(": ")[0].strip()
    by_function[name.rsplit("__mutmut_", 1)[0]].append(name)
for function, names in sorted(by_function.items()):
    k = min(len(names), max(2, math.ceil(fraction * len(names))))
    print(*random.Random(f"{seed}-{function}").sample(sorted(names), k), sep="\n")
' "$MUTATION_SAMPLE" "${MUTATION_SEED:-0}" >"$scratch/sample.txt"
    mapfile -t names <"$scratch/sample.txt"
    [ ${#names[@]} -gt 0 ] || { echo "mutation.sh: no mutants generated for $file; see $scratch/generate.log" >&2; exit 1; }
    echo "   sample: ${#names[@]} mutants (fraction $MUTATION_SAMPLE per function, seed ${MUTATION_SEED:-0}), listed in $scratch/sample.txt"
  fi
  (cd "$scratch" && PYTHONPATH="$scratch" python3 -m mutmut run --max-children "$JOBS" "${names[@]}" >"$scratch/run.log" 2>&1) || {
    echo "mutmut run failed for $file; see $scratch/run.log" >&2; tail -20 "$scratch/run.log" >&2; exit 1; }
  (cd "$scratch" && python3 -m mutmut results --all true) >"$scratch/results.txt"
  awk -F': ' '{n[$2]++} END {for (s in n) printf "   %s: %d\n", s, n[s]}' "$scratch/results.txt" | sort
  grep -v ': killed$' "$scratch/results.txt" || true
done
