#!/usr/bin/env bash
# Checks the service files: `systemd-analyze verify` on the unit (with ExecStart pointed at
# the given drllm binary, since verify insists that the binary exists), the launchd plist
# parsed as a property list, and the example config read by `drllm serve` itself.
#   systemd/verify.sh PATH/TO/drllm
set -euo pipefail
cd "$(dirname "$0")"
bin="$(realpath "${1:?usage: systemd/verify.sh PATH/TO/drllm}")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s|/usr/local/bin/drllm|$bin|" drllm.service > "$tmp/drllm.service"
SYSTEMD_LOG_LEVEL=warning systemd-analyze verify "$tmp/drllm.service"
echo "systemd-analyze verify: ok"
# what the unit must keep: readiness once loaded, resource bounds, loopback-only traffic, the
# API key from a root-only file
for line in "Type=notify" "NotifyAccess=main" "MemoryMax=" "TasksMax=" \
            "IPAddressAllow=localhost" "IPAddressDeny=any" "EnvironmentFile=-/etc/drllm/drllm.env"; do
  grep -q "^$line" drllm.service || { echo "drllm.service lacks $line" >&2; exit 1; }
done
echo "drllm.service settings: ok"
python3 - <<'PY'
import plistlib
p = plistlib.load(open("dev.drllm.serve.plist", "rb"))
assert p["Label"] == "dev.drllm.serve" and p["ProgramArguments"][1] == "serve", p
print("launchd plist: ok")
PY
# the example config must be accepted by the daemon's config reader (a missing model is
# the only complaint allowed: the file points at the installed location)
out=$(timeout 20 "$bin" serve --config drllm.toml --no-db --port 0 2>&1 || true)
case "$out" in
  *"model file /var/lib/drllm/models/"*"not found"*) echo "drllm.toml: ok" ;;
  *) echo "drllm.toml rejected: $out" >&2; exit 1 ;;
esac
