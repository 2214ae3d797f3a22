#!/usr/bin/env bash
# The binaries' command-line conventions (issue 16): --help and --version exit 0 on stdout,
# --version names the project's version, a port outside [0, 65535] is refused instead of served
# modulo 65536, and --admin_token_file guards the daemon exactly as the token in it would.
# Usage: command_line_test.sh OPTD OPTCTL OPTD_LOADGEN VERSION WORK_DIR
set -euo pipefail
optd=$1 optctl=$2 loadgen=$3 version=$4 work=$5
rm -rf "$work" && mkdir -p "$work"
fail() { echo "FAIL: $*" >&2; exit 1; }

for tool in "$optd" "$optctl" "$loadgen"; do
  name=$(basename "$tool")
  "$tool" --help >"$work/help" 2>"$work/help.err" || fail "$name --help exited $?"
  grep -q -- "--" "$work/help" || fail "$name --help printed no flags on stdout"
  [[ $("$tool" --version) == "$name $version" ]] || fail "$name --version: $("$tool" --version)"
done
grep -q -- "--admin_token_file" "$work/help" && fail "the last --help was optd-loadgen's, not optd's"
"$optd" --help >"$work/optd_help"
grep -q -- "--admin_token_file" "$work/optd_help" || fail "optd --help does not list --admin_token_file"

if "$optd" --listen=127.0.0.1:99999 --metrics_addr= 2>"$work/port.err"; then
  fail "optd served with --listen=127.0.0.1:99999"
fi
grep -q "port '99999' is not a number in \[0, 65535\]" "$work/port.err" || fail "$(cat "$work/port.err")"
if "$optd" --listen=127.0.0.1:0 --metrics_addr=127.0.0.1:70000 2>"$work/metrics.err"; then
  fail "optd served metrics with port 70000"
fi
grep -q "port '70000'" "$work/metrics.err" || fail "$(cat "$work/metrics.err")"

printf 'file-secret\n' >"$work/token"
"$optd" --listen=127.0.0.1:0 --metrics_addr= --port_file="$work/port" \
  --admin_token_file="$work/token" 2>"$work/optd.log" &
pid=$!
trap 'kill -KILL $pid 2>/dev/null || true' EXIT
for _ in $(seq 200); do [[ -s $work/port ]] && break; sleep 0.05; done
server=127.0.0.1:$(cat "$work/port")
if OPTD_ADMIN_TOKEN= "$optctl" --server="$server" --admin_token=guess list >/dev/null 2>&1; then
  fail "a wrong admin token listed sessions"
fi
OPTD_ADMIN_TOKEN= "$optctl" --server="$server" --admin_token=file-secret list >/dev/null ||
  fail "the token from --admin_token_file did not list sessions"
tr '\0' ' ' </proc/$pid/cmdline >"$work/cmdline"
grep -q file-secret "$work/cmdline" && fail "the token is in the command line"
kill -TERM $pid
wait $pid
echo "command-line conventions hold"
