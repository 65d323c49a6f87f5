#!/usr/bin/env bash
# `make test` of an older commit and of this checkout, back to back on this machine: the wall time of each
# (pytest's own figure), its CPU, and the ratio. Issue #22 asks for the suite in half the time of the
# commit where it was filed (d3cae72), "same machine, same run of the day": this is that pair.
#
#   bash bench/suite_pair.sh [OLD_COMMIT]        # default d3cae72; ~20 min on 2 cores
#   SUITE_PAIR_ARGS=tests/test_config.py bash bench/suite_pair.sh   # a subset on both sides (a quick check)
#   SUITE_PAIR_KEEP=1 bash bench/suite_pair.sh   # keep the clones and both logs (old.log, new.log), to read a failure
#
# Both run as on a fresh machine: a clean clone (the old one in a temp folder, the new one this checkout's
# HEAD) and an empty TORCH_EXTENSIONS_DIR each (a fresh machine has no compiled DeepSpeed ops; the old commit
# compiled one on its first training rank). The old clone gets a venv of its own whose packages are this
# checkout's .venv (the pins are the same: a .pth line), so nothing is downloaded. The old suite ran in one
# process (its Makefile had no workers); the new one runs as `make test` does. Run it on a quiet machine:
# the load is printed before and after each run.
set -euo pipefail
OLD=${1:-d3cae72}
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/hiervl-suite-pair.XXXXXX)
if [ -n "${SUITE_PAIR_KEEP:-}" ]; then echo "clones and logs kept in $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
SITE=$("$HERE/.venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

git clone -q "$HERE" "$WORK/old" && git -C "$WORK/old" checkout -q "$OLD"
git clone -q "$HERE" "$WORK/new"
[ -e "$WORK/shared" ] || ln -s "$HERE/../shared" "$WORK/shared"   # the tests read ../shared/fixtures
for side in old new; do
    python3.11 -m venv "$WORK/$side/.venv"
    echo "$SITE" > "$WORK/$side/.venv/lib/python3.11/site-packages/zz_deps.pth"
    printf '#!%s\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n' \
        "$WORK/$side/.venv/bin/python" > "$WORK/$side/.venv/bin/ray" && chmod +x "$WORK/$side/.venv/bin/ray"
    (cd "$WORK/$side" && make install > "$WORK/$side-install.log" 2>&1)
done

run() {  # side, extra make arguments
    mkdir -p "$WORK/ext-$1"
    echo "$1 ($(git -C "$WORK/$1" rev-parse --short HEAD)): load before $(cut -d' ' -f1-3 /proc/loadavg)"
    (cd "$WORK/$1" && TORCH_EXTENSIONS_DIR="$WORK/ext-$1" /usr/bin/time -f "%e s wall, %U s user, %S s sys" \
        make test "${@:2}" > "$WORK/$1.log" 2>&1) || true
    grep -E "passed|failed" "$WORK/$1.log" | tail -1
    tail -1 "$WORK/$1.log"
    echo "    compiled ops: $(find "$WORK/ext-$1" -name '*.so' | wc -l); load after $(cut -d' ' -f1-3 /proc/loadavg)"
}
run old "PYTEST_ARGS=-q -p no:xdist ${SUITE_PAIR_ARGS:-}"
run new "PYTEST_ARGS=-q ${SUITE_PAIR_ARGS:-}"
old=$(grep -oE "in [0-9.]+s" "$WORK/old.log" | tail -1 | tr -dc '0-9.')
new=$(grep -oE "in [0-9.]+s" "$WORK/new.log" | tail -1 | tr -dc '0-9.')
python3 -c "print(f'pytest wall: old $old s, new $new s: new/old = {$new / $old:.2f} (the issue asks <= 0.50)')"
