#!/usr/bin/env bash
# `make dev`: a local cluster with the CRDs, the operator and an example worker, then one example
# run end to end. Everything keeps running afterwards; `make down` (this script with --down)
# stops the processes it started and the cluster.
#
# Usage: hack/dev.sh [--down] CLUSTER_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
KT=.venv/bin/kubetask

if [ "${1:-}" = "--down" ]; then
  dir=$2
  # The worker deletes its Pod when it stops, so it is waited for (up to 20 s) while the API
  # server still runs; only then does the cluster go.
  for name in worker operator; do
    pidfile="$dir-$name.pid"
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -KILL "$pid" 2>/dev/null || true
      rm -f "$pidfile"
      echo "Stopped the $name."
    fi
  done
  $KT cluster down --dir "$dir"
  exit 0
fi

dir=$1
if ! $KT cluster env --dir "$dir" >/dev/null 2>&1; then
  $KT cluster up --dir "$dir"
else
  echo "Reusing the local cluster in $dir."
fi
eval "$($KT cluster env --dir "$dir")"

kubectl apply -f crds/ >/dev/null
kubectl wait --for=condition=Established --timeout=60s crd --all >/dev/null
echo "Applied the CRDs: $(kubectl get crd -o name | grep kubetask.io | tr '\n' ' ')"

start() {  # name, then the kubetask arguments
  local name=$1; shift
  local pidfile="$dir-$name.pid"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "The $name is already running (pid $(cat "$pidfile"))."
    return
  fi
  nohup $KT "$@" >"$dir-$name.log" 2>&1 &
  echo $! >"$pidfile"
  echo "Started the $name (pid $!, log $dir-$name.log)."
}
start operator operator
start worker worker examples.python.hello_worker:worker

echo "Running the example task 'hello' ..."
$KT run hello --input '{"name": "kubetask"}' --wait --timeout 120

cat <<TEXT

kubetask is running locally. Try:
  eval "\$(.venv/bin/kubetask cluster env --dir $dir)"
  kubectl get taskruns                 # or: kubectl get kubetask
  .venv/bin/kubetask run hello --input '{"name": "you"}' --wait
  kubectl apply -f examples/           # the example manifests
Stop everything with: make down
TEXT
