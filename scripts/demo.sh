#!/usr/bin/env bash
# A tour of silo, run by `make demo` (which installs what it needs first).
#
# Each step prints the command, runs it, shows its output and checks what it must
# show; the first surprise stops the tour with exit status 1. Nothing on the host is
# changed: everything the commands write lands in an overlay that is thrown away, or
# under a temporary directory removed at the end.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SILO="$REPO/.venv/bin/silo"
PY="$REPO/.venv/bin/python"
[ -x "$SILO" ] && [ -x "$PY" ] || { echo "demo: run 'make demo' (it installs silo first)" >&2; exit 1; }

WORK="$(mktemp -d /tmp/silo-demo.XXXXXX)"
NOTE="$HOME/silo-demo-note-$$.txt"
# Stop the daemon the workspace step started (it runs with SILO_DAEMON_DIR below $WORK).
stop_daemon() {
    local pid
    for pid in $(pgrep -f 'silo.daemon'); do
        if tr '\0' '\n' </proc/"$pid"/environ 2>/dev/null | grep -qx "SILO_DAEMON_DIR=$WORK/silod"; then
            kill -TERM "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        fi
    done
}
cleanup() { stop_daemon; rm -rf "$WORK"; }
trap cleanup EXIT

if [ -t 1 ]; then B=$'\e[1m' G=$'\e[32m' R=$'\e[31m' N=$'\e[0m'; else B="" G="" R="" N=""; fi

step() { printf '\n%s== %s%s\n' "$B" "$*" "$N"; }
ok() { printf '   %s✓ %s%s\n' "$G" "$*" "$N"; }
fail() { printf '   %s✗ %s%s\n\ndemo: FAILED\n' "$R" "$*" "$N" >&2; exit 1; }

# The shell's way of writing one word, readably: bare when safe, else in single quotes.
quote() {
    if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"
    else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
SHOW_LINES=40

# run CMD...: show it (with `silo` for the full launcher path), run it with no stdin
# and a time limit, show its output; sets RC, OUT and ERR. Never exits by itself.
run() {
    local shown=() a
    for a in "$@"; do shown+=("${a/#"$SILO"/silo}"); done
    shown=("${shown[@]/#"$PY"/python}")
    printf '$'; for a in "${shown[@]}"; do printf ' %s' "$(quote "$a")"; done; printf '\n'
    set +e
    timeout --kill-after=5 120 "$@" </dev/null >"$WORK/out" 2>"$WORK/err"
    RC=$?
    set -e
    OUT="$(cat "$WORK/out")"
    ERR="$(cat "$WORK/err")"
    if [ -n "$OUT" ]; then
        local total; total="$(wc -l <"$WORK/out")"
        sed -n "1,${SHOW_LINES}p" "$WORK/out" | sed 's/^/    /'
        [ "$total" -le "$SHOW_LINES" ] || printf '    ... (%s more lines)\n' "$((total - SHOW_LINES))"
    fi
    [ -z "$ERR" ] || sed 's/^/    stderr: /' "$WORK/err"
    [ "$RC" -eq 0 ] || printf '    (exit code %s)\n' "$RC"
}
expect_ok() { [ "$RC" -eq 0 ] || fail "expected exit code 0, got $RC"; }

printf '%ssilo demo%s: isolated workspaces for Linux (%s)\n' "$B" "$N" "$("$SILO" --version 2>/dev/null || echo silo)"
printf 'host: %s, user %s, hostname %s, %s processes\n' \
    "$(uname -sr)" "$(id -un)" "$(hostname)" "$(ls -d /proc/[0-9]* | wc -l)"

step "1. Who runs the command? A user of its own, never host root"
run "$SILO" run -- sh -c 'id; cat /proc/self/uid_map'
expect_ok
if printf '%s\n' "$OUT" | awk 'NF == 3 && $2 == 0 { found = 1 } END { exit !found }'; then
    fail "a sandbox id maps to host root"
fi
ok "uid_map: the sandbox's ids are an unprivileged host range (inside, host, count)"

step "2. Its own hostname"
run "$SILO" run --hostname demo-box -- hostname
expect_ok
[ "$OUT" = "demo-box" ] || fail "expected hostname demo-box"
ok "UTS namespace: the host's hostname is untouched ($(hostname))"

step "3. Its own processes: the host's are invisible"
run "$SILO" run -- ps -e -o pid,comm
expect_ok
n="$(printf '%s\n' "$OUT" | tail -n +2 | wc -l)"
[ "$n" -le 5 ] || fail "expected a handful of processes, saw $n"
ok "PID namespace: $n processes inside"

step "4. None of the host's home directories"
printf 'host: ls -A /home: %s\n' "$(ls -A /home 2>/dev/null | tr '\n' ' ')"
run "$SILO" run -- ls -A /home
expect_ok
[ -n "$OUT" ] || printf '    (empty)\n'
for d in /home/*; do
    [ -e "$d" ] || continue
    if printf '%s\n' "$OUT" | grep -qx "$(basename "$d")"; then
        fail "the host's $d is visible"
    fi
done
ok "the root is the host's system, read-only, plus a private writable layer"

step "5. Only loopback networking"
run "$SILO" run -- ip -brief link
expect_ok
if printf '%s\n' "$OUT" | grep -v '^lo ' | grep -q .; then fail "an interface other than lo"; fi
ok "network namespace: lo only"

step "6. Writes to the system (/etc here) land in an overlay and vanish with the sandbox"
target="/etc/silo-demo-$$"
run "$SILO" run -- sh -c "echo written inside > $target && cat $target"
expect_ok
[ "$OUT" = "written inside" ] || fail "the write inside did not read back"
[ ! -e "$target" ] || fail "$target appeared on the host"
ok "the host's $target does not exist"

step "7. Limits: a 256 MiB balloon under --memory 64M is killed, and silo says why"
run "$SILO" run --memory 64M -- python3 -c "b = b\"x\" * (256 << 20); print(\"survived\")"
[ "$RC" -ne 0 ] || fail "the balloon was not stopped"
if printf '%s\n' "$OUT" | grep -q survived; then fail "the balloon survived"; fi
printf '%s\n' "$ERR" | grep -qi memory || fail "silo did not name the memory limit"
ok "exit code $RC, the memory limit named"

step "8. The app level: copy-on-write view of \$HOME and chosen paths (NOT a security boundary)"
mkdir -p "$WORK/project"
echo "original" >"$WORK/project/kept.txt"
echo "original" >"$WORK/project/removed.txt"
cd "$WORK/project"
run "$SILO" run --isolation app --cow "$WORK/project" --keep "$WORK/upper" -- \
    sh -c "echo changed >> kept.txt; rm removed.txt; echo new > added.txt; echo note > $NOTE; ls"
cd "$REPO"
expect_ok
[ "$(cat "$WORK/project/kept.txt")" = "original" ] || fail "kept.txt changed on the host"
[ -e "$WORK/project/removed.txt" ] || fail "removed.txt vanished from the host"
[ ! -e "$WORK/project/added.txt" ] || fail "added.txt appeared on the host"
[ ! -e "$NOTE" ] || { rm -f "$NOTE"; fail "$NOTE appeared on the host"; }
ok "the host's files are untouched"
run "$SILO" diff "$WORK/upper"
expect_ok
for f in kept.txt removed.txt added.txt "$(basename "$NOTE")"; do
    printf '%s\n' "$OUT" | grep -q "$f" || fail "silo diff does not list $f"
done
ok "silo diff lists what the app added, changed and deleted"

step "9. silo plan: what a run would do, without running anything"
SHOW_LINES=12 run "$SILO" plan --memory 64M -- /bin/true
expect_ok
ok "plans are data: printed, diffed and tested without root"

step "10. From Python: the SDK"
cat >"$WORK/sdk.py" <<'EOF'
from silo import Sandbox

with Sandbox(memory="256M") as sb:
    print(sb.run(["python3", "-c", "print(6*7)"]).stdout)
EOF
sed 's/^/    | /' "$WORK/sdk.py"
run "$PY" "$WORK/sdk.py"
expect_ok
[ "$OUT" = "b'42\\n'" ] || fail "expected b'42\\n'"
ok "one Sandbox, as many runs as you like; the spawner keeps them fast"

step "11. Workspaces: a persistent sandbox owned by silod, snapshotted and reset"
chmod 711 "$WORK"  # the workspaces' mapped root must reach its state below it
export SILO_STATE_DIR="$WORK/state" SILO_DAEMON_DIR="$WORK/silod"
run "$SILO" create demo-ws
expect_ok
run "$SILO" start demo-ws
expect_ok
run "$SILO" exec demo-ws -- sh -c 'echo tool > /usr/local/bin/demo-tool && echo installed'
expect_ok
[ ! -e /usr/local/bin/demo-tool ] || fail "/usr/local/bin/demo-tool appeared on the host"
ok "the workspace's root wrote to its /usr; the host's /usr is untouched"
run "$SILO" stop demo-ws
expect_ok
run "$SILO" start demo-ws
run "$SILO" exec demo-ws -- cat /usr/local/bin/demo-tool
expect_ok
[ "$OUT" = "tool" ] || fail "the file did not survive stop/start"
ok "its files survive stop and start"
run "$SILO" stop demo-ws
run "$SILO" snapshot demo-ws installed
expect_ok
run "$SILO" reset demo-ws
expect_ok
run "$SILO" start demo-ws
run "$SILO" exec demo-ws -- sh -c 'test -e /usr/local/bin/demo-tool && echo still-there || echo gone'
[ "$OUT" = "gone" ] || fail "reset did not bring the workspace back to its base"
ok "reset brings it back to the base; the snapshot 'installed' can restore it"
run "$SILO" rm -f demo-ws
expect_ok
stop_daemon
ok "the demo's daemon is stopped"

printf '\n%sdemo: all steps passed%s\n' "$G" "$N"
