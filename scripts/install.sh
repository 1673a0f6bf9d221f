#!/usr/bin/env bash
# Install everything silo needs to run, be tested and be benchmarked on Debian 12.
#
#   bash scripts/install.sh        (make install / make demo / make test call it)
#
# What it does, each step skipped when already done, so a second run takes well under
# a second:
#   1. apt packages (apt-get update only when one is missing); needs root (or sudo);
#   2. .venv made with Debian's /usr/bin/python3 (not a pyenv/conda python on PATH),
#      with Debian's libseccomp binding (python3-seccomp) linked into it;
#   3. `pip install -e '.[dev]'` (PyPI), then builds silo's C helpers: the sandbox
#      init, setup and spawn helpers (`python -m silo.native build`)
#      and the fast `silo` launcher
#      (`python -m silo.cli.launcher install`);
#   4. the unprivileged test user `silotest` (root only);
#   5. a guest kernel for the vm level (`silo kernel fetch`, root only, when the host's
#      own kernel is not readable).
# Steps 2-3 are remembered in .venv/.silo-install-stamp, a hash of the inputs they
# depend on (pyproject.toml, this script, the launcher's and the C helpers' sources).
#
# Environment: SILO_TEST_USER (default silotest), SILO_FORCE_INSTALL=1 redoes steps 2-3.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

VENV="$REPO/.venv"
PY=/usr/bin/python3
STAMP="$VENV/.silo-install-stamp"
TEST_USER="${SILO_TEST_USER:-silotest}"

APT_PACKAGES=(
    # Python: Debian's interpreter, venv support, headers, the libseccomp binding
    python3 python3-venv python3-dev python3-seccomp libseccomp2
    # sandbox plumbing: subordinate ids, netlink/ip, runuser/unshare/nsenter, ps
    uidmap iproute2 util-linux procps
    # networks: nftables (libnftables' JSON API), pasta for rootless, iperf3 for make bench
    nftables libnftables1 passt iperf3
    # the vm level: QEMU, virtiofsd (qemu-system-common), qemu-img, mkfs.ext4 for the
    # workspaces' disks, busybox for the bench's raw-QEMU peer, and dpkg-deb/apt-get
    # download for 'silo kernel fetch'
    qemu-system-x86 qemu-system-common qemu-utils e2fsprogs busybox-static lz4 zstd
    # peers measured by `make bench`
    bubblewrap runc runsc firejail hyperfine
    # building native helpers
    gcc libc6-dev make
    # the curated /etc of a sandbox carries the host's CA certificates
    ca-certificates
)

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "'$*' needs root: run this as root (or install sudo)"
    fi
}

# --- 1. apt packages ---------------------------------------------------------------
if ! command -v dpkg-query >/dev/null 2>&1; then
    die "this installer supports Debian 12 (and derivatives with dpkg/apt) only"
fi
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)"
    [ "${status:0:2}" = "ii" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "apt packages missing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq
    as_root apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends "${missing[@]}" </dev/null
else
    say "apt packages: all ${#APT_PACKAGES[@]} present"
fi
[ -x "$PY" ] || die "$PY is missing after installing python3"

# --- 2. the virtualenv ---------------------------------------------------------------
# Reuse .venv only if it was made from Debian's python (the seccomp binding is built
# for it); one made from another interpreter is replaced.
venv_ok=0
if [ -x "$VENV/bin/python" ]; then
    base="$("$VENV/bin/python" -c 'import sys; print(sys.base_prefix)' 2>/dev/null || true)"
    want="$("$PY" -c 'import sys; print(sys.base_prefix)')"
    if [ "$base" = "$want" ]; then
        venv_ok=1
    else
        say ".venv was made by another python ($base), recreating it with $PY"
        rm -rf "$VENV"
    fi
fi
if [ "$venv_ok" -eq 0 ]; then
    say "creating .venv with $PY"
    "$PY" -m venv "$VENV"
fi

# Debian's libseccomp binding (python3-seccomp) is not on PyPI: link it in.
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
shopt -s nullglob
so_files=(/usr/lib/python3/dist-packages/seccomp.cpython-*.so)
shopt -u nullglob
[ "${#so_files[@]}" -gt 0 ] || die "python3-seccomp's module is missing from /usr/lib/python3/dist-packages"
for so in "${so_files[@]}"; do
    [ "$(readlink "$site/$(basename "$so")" 2>/dev/null || true)" = "$so" ] \
        || ln -sf "$so" "$site/"
done

# --- 3. Python dependencies and the launcher --------------------------------------
launcher_src="$REPO/src/silo/cli/launcher.py"
stamp_inputs=(pyproject.toml scripts/install.sh)
[ -f "$launcher_src" ] && stamp_inputs+=(src/silo/cli/launcher.py)
shopt -s nullglob
stamp_inputs+=(src/silo/native/*.c src/silo/native/__init__.py)
shopt -u nullglob
want_stamp="$(cat "${stamp_inputs[@]}" | sha256sum | cut -d' ' -f1) $("$VENV/bin/python" -V 2>&1)"
have_stamp="$(cat "$STAMP" 2>/dev/null || true)"

if [ "${SILO_FORCE_INSTALL:-0}" = 1 ] || [ "$want_stamp" != "$have_stamp" ] \
    || [ ! -x "$VENV/bin/pytest" ] || [ ! -e "$VENV/bin/silo" ] \
    || { [ -f src/silo/native/init.c ] && [ ! -x src/silo/native/bin/silo-init ]; } \
    || { [ -f src/silo/native/setup.c ] && [ ! -x src/silo/native/bin/silo-setup ]; } \
    || { [ -f src/silo/native/agent.c ] && [ ! -x src/silo/native/bin/silo-agent ]; } \
    || { [ -f src/silo/native/spawn.c ] && [ ! -e src/silo/native/bin/libsilo-spawn.so ]; }; then
    rm -f "$STAMP"
    say "pip install -e '.[dev]'"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]' </dev/null
    if [ -f src/silo/native/init.c ]; then
        say "building silo-init, silo-setup, silo-agent and libsilo-spawn.so (src/silo/native/bin)"
        "$VENV/bin/python" -m silo.native build silo-init silo-setup silo-agent libsilo-spawn.so
    fi
    if [ -f "$launcher_src" ]; then
        say "installing the fast launcher (.venv/bin/silo)"
        "$VENV/bin/python" -m silo.cli.launcher install
    fi
    "$VENV/bin/python" -c 'import seccomp, silo' \
        || die "the venv cannot import seccomp and silo after installing"
    printf '%s\n' "$want_stamp" >"$STAMP"
else
    say "python dependencies: up to date"
fi

# --- 4. the unprivileged test user ---------------------------------------------------
if id -u "$TEST_USER" >/dev/null 2>&1; then
    say "test user $TEST_USER: present"
elif [ "$(id -u)" -eq 0 ]; then
    say "creating the unprivileged test user $TEST_USER"
    useradd --create-home --shell /bin/bash "$TEST_USER"
else
    say "not root: skipping the test user $TEST_USER (tests that need it will skip)"
fi
# Tests run .venv/bin/silo as the test user: the checkout must be reachable by them.
if [ "$(id -u)" -eq 0 ] && id -u "$TEST_USER" >/dev/null 2>&1 \
    && ! runuser -u "$TEST_USER" -- test -x "$VENV/bin/python" 2>/dev/null; then
    say "warning: $TEST_USER cannot reach $VENV (a parent directory is not searchable by"
    say "  others, e.g. /root); the tests that run silo as $TEST_USER will fail. Put the"
    say "  checkout under a directory others can enter, such as /srv or /opt."
fi

# --- 5. a guest kernel for the vm level ---------------------------------------------
# The host's own when it is readable; otherwise Debian's cloud kernel (silo kernel fetch,
# into /var/cache/silo: every user's vm runs find it there).
if "$VENV/bin/silo" kernel show >/dev/null 2>&1; then
    say "guest kernel: $("$VENV/bin/silo" kernel show)"
elif [ "$(id -u)" -eq 0 ]; then
    say "fetching a guest kernel for the vm level (silo kernel fetch)"
    "$VENV/bin/silo" kernel fetch || die "silo kernel fetch failed: the vm level needs a guest kernel"
else
    say "no guest kernel, and not root: run 'silo kernel fetch' for the vm level"
fi

say "done"
