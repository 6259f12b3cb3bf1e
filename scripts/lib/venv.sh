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
# Pinned versions of the Python peers the scripts share (scripts/check-aws and scripts/cloud-like
# pin moto themselves, to the same version).
OTEL_PROTO_VERSION=1.45.2     # the OTLP types the scripts' trace receiver decodes with
CARGO_LAMBDA_VERSION=1.9.2    # cargo lambda watch | invoke | build
MOTO_VERSION=5.2.1            # moto_server: DynamoDB, SQS, S3
