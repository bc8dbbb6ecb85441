#!/usr/bin/env bash
# A whole deployment on this machine, over TLS with site authentication: certificates, the
# coordinator and one site agent per data file, each its own process; everything is stopped at
# the end (also on Ctrl-C or failure).
#   deploy/scripts/localhost.sh RUN_CONFIG OUT_DIR SITE_FILE [SITE_FILE ...]
# e.g. with the demo's split (fedtune split-data writes site-*.csv, the coordinator's eval.csv and
# labels.txt, the label set every site declares; or set LABELS=a,b,...):
#   fedtune split-data --out /tmp/demo-split
#   sed 's#/data/eval.csv#/tmp/demo-split/eval.csv#' deploy/run.toml > /tmp/run.toml
#   deploy/scripts/localhost.sh /tmp/run.toml runs/localhost /tmp/demo-split/site-{0,1,2}.csv
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,11p' "$0"; exit 2; }
config=$1; out=$2; shift 2
labels=${LABELS:-$(cat "$(dirname "$1")/labels.txt" 2>/dev/null || true)}
label_flag=(); [ -n "$labels" ] && label_flag=(--labels "$labels")
work=$(mktemp -d); port=${PORT:-9092}
export FLWR_HOME="$work/flwr" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

sites=(); for i in $(seq 0 $(($# - 1))); do sites+=(--site "site-$i"); done
fedtune certs init --dir "$work/certs" "${sites[@]}" > /dev/null
start=$(date +%s)
fedtune server --certs "$work/certs" --port "$port" --state-dir "$work/coordinator" \
    --config "$config" --out "$out" > >(tee "$work/server.log") 2>&1 & server=$!; pids+=("$server")
# A site whose key is not registered yet is refused: start the sites once all are registered.
until [ "$(grep -c ': registered' "$work/server.log" 2>/dev/null)" = "$#" ]; do
    kill -0 "$server" 2>/dev/null || exit 1; sleep 1
done
i=0
for data in "$@"; do
    fedtune client --superlink "127.0.0.1:$port" --ca "$work/certs/ca.crt" --key "$work/certs/sites/site-$i.key" \
        --data "$data" "${label_flag[@]}" --state-dir "$work/site-$i" --runtime-port $((port + 100 + i)) \
        > "$work/site-$i.log" 2>&1 &
    pids+=($!); i=$((i + 1))
done
rc=0; wait "$server" || rc=$?
echo "localhost deployment: $# sites, wall time $(( $(date +%s) - start )) s, exit $rc (site logs in $work)"
exit $rc
