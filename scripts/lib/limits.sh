# Sourced by the scripts that drive the platform from one address far faster than a person:
# the gateway's rate limits (rate_limit.*) set to a per-second figure, 0 turning them off, and
# the unpaid-order quota (limits.max_pending_*) off. crates/mercato/tests/edge.rs and
# stock_and_limits.rs test the limits themselves.
rate_limits_at() { # rate_limits_at PER_SECOND
    local limit
    for limit in PER_ADDRESS PER_USER SIGN_IN READS WRITES; do
        export "MERCATO_RATE_LIMIT__${limit}_PER_SEC=$1"
    done
    export MERCATO_LIMITS__MAX_PENDING_ORDERS_PER_USER=0 MERCATO_LIMITS__MAX_PENDING_UNITS_PER_USER=0
}
