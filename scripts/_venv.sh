# Sourced by scripts/serve and scripts/test: make (or refresh) .venv.
#
# The caller sets EXTRAS to what it needs on top of the runtime: scripts/serve
# asks for "redis" (so --redis works), scripts/test for "test redis". A venv
# that already holds more than asked for is kept, so `scripts/serve` after
# `scripts/test` installs nothing. The venv is rebuilt when pyproject.toml
# changes (a stamp holds its hash and the extras installed), so a `git pull`
# that adds a dependency is picked up by itself.
#
# pip's output goes to .venv/pip.log and is shown only when it fails: a user
# who asked to serve should not read setuptools' editable-mode warnings.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
STAMP="$VENV/.trionet-stamp"
EXTRAS="${EXTRAS:-redis}"
want="$(cd "$ROOT" && "$PY" -c 'import hashlib,sys;print(hashlib.sha256(open("pyproject.toml","rb").read()).hexdigest())')"

_venv_ok() {
    [ -x "$VENV/bin/python" ] || return 1
    local stamp
    stamp="$(cat "$STAMP" 2>/dev/null)" || return 1
    set -- $stamp
    [ "${1:-}" = "$want" ] || return 1
    shift
    local have=" $* " extra
    for extra in $EXTRAS; do
        case "$have" in *" $extra "*) ;; *) return 1 ;; esac
    done
}

if ! _venv_ok; then
    # Keep what was installed before (e.g. the test tools) when adding more.
    old="$(cat "$STAMP" 2>/dev/null | cut -s -d' ' -f2-)" || old=""
    [ "$(cat "$STAMP" 2>/dev/null | cut -d' ' -f1)" = "$want" ] || old=""
    all="$(echo $old $EXTRAS | tr ' ' '\n' | sort -u | tr '\n' ' ')"
    echo "setting up $VENV with trionet[${all% }] (the first run takes about 2 minutes) ..." >&2
    log="$VENV/pip.log"
    "$PY" -m venv "$VENV"
    : > "$log"
    "$VENV/bin/python" -m pip install --upgrade pip >>"$log" 2>&1 || true
    if ! "$VENV/bin/python" -m pip install -e "$ROOT[$(echo $all | tr ' ' ',')]" \
            --config-settings editable_mode=compat >>"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "pip failed; its whole output is in $log" >&2
        exit 1
    fi
    echo "$want $all" > "$STAMP"
    echo "done: run a command in it with .venv/bin/python -m ..., or '. .venv/bin/activate'" >&2
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
