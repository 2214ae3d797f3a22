# Sourced by the benchmark scripts: raw TCP over loopback with iperf3, the transport ceiling their
# figures are set against. iperf3_loopback DIR writes DIR/iperf3.{1,2,3}.json (3 runs of 3 s).
iperf3_loopback() {
  local dir=$1 port=$((20000 + RANDOM % 20000)) run server
  for run in 1 2 3; do
    iperf3 --server --one-off --port "$port" >/dev/null 2>&1 &
    server=$!
    sleep 0.5
    iperf3 --client 127.0.0.1 --port "$port" --time 3 --json >"$dir/iperf3.$run.json"
    wait "$server" || true
  done
}
