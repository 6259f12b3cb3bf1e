# Sourced by the benchmarks that export spans: an OTLP/HTTP sink that accepts every batch and
# drops it (nginx answering 200 on /v1/traces: no collector competes for the cores).
#   start_otlp_sink DIR   starts it with its files in DIR and sets OTLP_SINK (its base URL);
#                         stop it with `kill -QUIT "$(cat DIR/nginx.pid)"`.
start_otlp_sink() { # start_otlp_sink DIR
    local dir="$1" port
    if ! command -v nginx >/dev/null 2>&1; then
        echo "installing nginx (Debian package)" >&2
        if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq nginx >/dev/null; else sudo apt-get install -y nginx; fi
    fi
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    cat >"$dir/nginx.conf" <<CONF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $dir/nginx-body;
    server {
        listen 127.0.0.1:$port;
        client_max_body_size 64m;
        location = /v1/traces { return 200; }
    }
}
CONF
    "$(command -v nginx || echo /usr/sbin/nginx)" -c "$dir/nginx.conf" -e "$dir/nginx-error.log"
    OTLP_SINK="http://127.0.0.1:$port"
}
