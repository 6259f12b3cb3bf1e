# Sourced by the checks that run Python peers: `venv DIR PACKAGE...` makes a virtualenv in DIR
# with PACKAGE... installed (pinned by the caller), once; later calls find it and return.
# The caller defines `say` (its own prefix on messages).
venv() { # venv DIR PACKAGE...
    local dir="$1"; shift
    if [ ! -x "$dir/bin/python" ] || ! "$dir/bin/pip" show -q "${1%%[=\[]*}" >/dev/null 2>&1; then
        say "installing $* into $dir"
        python3 -m venv "$dir" || { say "python3 -m venv failed (apt-get install -y python3-venv)"; exit 1; }
        "$dir/bin/pip" install -q "$@" || { say "pip install $* failed"; exit 1; }
    fi
}
# The pinned version of the OTLP types the scripts' trace receiver decodes with.
OTEL_PROTO_VERSION=1.45.2
