#!/usr/bin/env bash
# Run the test suite under the conditions it must pass in besides the default one:
# oneDNN off and on, oneDNN held to AVX2 and to SSE4.1, and a machine made busy by two
# CPU-burning processes. Prints one line per variant (its time and pytest's summary) and exits
# non-zero if any variant failed. Usage: scripts/test-variants.sh [VARIANT ...]
# Variants: onednn-off onednn-on avx2 sse41 busy (default: all). Extra pytest arguments go in
# PYTEST_ARGS, e.g. PYTEST_ARGS="-m 'not slow'".
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=.venv/bin/python
WORKERS=${TEST_WORKERS:-2}
LOGS=${LOGS:-bench/.work/test-variants}
mkdir -p "$LOGS"

run_variant() {
    local name=$1
    shift
    local log="$LOGS/$name.log"
    local started=$SECONDS
    # shellcheck disable=SC2086 # PYTEST_ARGS is meant to split into arguments
    env "$@" "$PYTHON" -m pytest -n "$WORKERS" --dist worksteal -p no:cacheprovider --durations=25 \
        ${PYTEST_ARGS:-} >"$log" 2>&1
    local code=$?
    local summary
    summary=$(grep -E '^=+ .*(passed|failed|error).* =+$' "$log" | tail -n 1 | tr -d '=')
    printf '%-12s exit %d  %4d s  load %s  %s  (%s)\n' "$name" "$code" $((SECONDS - started)) \
        "$(cut -d' ' -f1-3 /proc/loadavg)" "${summary:-no summary}" "$log"
    return $code
}

burners=()
stop_burners() {
    if [ ${#burners[@]} -gt 0 ]; then
        kill "${burners[@]}" 2>/dev/null
        wait "${burners[@]}" 2>/dev/null
    fi
    burners=()
}
trap stop_burners EXIT

busy() {
    # Two processes that each keep a core busy for the whole run, ended by their own pids.
    yes >/dev/null &
    burners+=($!)
    yes >/dev/null &
    burners+=($!)
    run_variant busy
    local code=$?
    stop_burners
    return $code
}

variants=("$@")
[ ${#variants[@]} -eq 0 ] && variants=(onednn-off onednn-on avx2 sse41 busy)
failed=0
for variant in "${variants[@]}"; do
    case $variant in
        onednn-off) run_variant "$variant" TF_ENABLE_ONEDNN_OPTS=0 || failed=1 ;;
        onednn-on) run_variant "$variant" TF_ENABLE_ONEDNN_OPTS=1 || failed=1 ;;
        # With oneDNN on, so that its instruction-set cap takes effect.
        avx2) run_variant "$variant" TF_ENABLE_ONEDNN_OPTS=1 ONEDNN_MAX_CPU_ISA=AVX2 || failed=1 ;;
        sse41) run_variant "$variant" TF_ENABLE_ONEDNN_OPTS=1 ONEDNN_MAX_CPU_ISA=SSE41 || failed=1 ;;
        busy) busy || failed=1 ;;
        *) echo "unknown variant: $variant" >&2; failed=1 ;;
    esac
done
exit $failed
