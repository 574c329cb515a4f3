#!/usr/bin/env bash
# Run a local BuildKit for bkdbg's development, tests and demos.
#
# Debian 12 ships no BuildKit, so this uses the one embedded in Docker Engine 26
# from Debian 13 (trixie): only docker.io, docker-cli and docker-buildx come from
# trixie, while containerd and runc stay Debian 12's. The engine is private to
# bkdbg: its own socket, data root, exec root and log, and no iptables rules.
# BuildKit's gRPC API is reached by `POST /grpc` upgraded to h2c on its socket.
#
# usage: scripts/local-buildkit.sh start|stop|status|env
#   start   install what is missing, start the engine, create the test image
#   stop    stop the engine that `start` started (found by its pid file)
#   status  print whether the engine responds, its version and address (exit 0 up, 3 down)
#   env     print `export` lines for eval: BUILDKIT_HOST and BKDBG_TEST_ADDR
#
# Every command is idempotent, needs root (except env and status), and runs from any cwd.
set -euo pipefail

readonly STATE_DIR=/run/bkdbg-buildkit
readonly SOCKET="$STATE_DIR/docker.sock"
readonly EXEC_ROOT="$STATE_DIR/exec"
readonly PID_FILE="$STATE_DIR/dockerd.pid"
readonly CONFIG_FILE="$STATE_DIR/daemon.json"
readonly DATA_ROOT=/var/lib/bkdbg-buildkit
readonly LOG_DIR=/var/log/bkdbg-buildkit
readonly LOG_FILE="$LOG_DIR/dockerd.log"
readonly ADDRESS="docker://unix://$SOCKET"
readonly TEST_IMAGE=bkdbg-test/busybox:latest

readonly APT_SOURCES=/etc/apt/sources.list.d/bkdbg-trixie.sources
readonly APT_PIN=/etc/apt/preferences.d/bkdbg-trixie
readonly START_TIMEOUT=60   # seconds until the engine must respond after start
readonly STOP_TIMEOUT=30    # seconds until dockerd must exit after SIGTERM

# The Debian docker-cli package installs /usr/bin/docker. A docker client earlier on PATH
# (such as /usr/local/bin/docker) works as well, because clients negotiate the API version.
DOCKER=$(command -v docker || echo /usr/bin/docker)

log() { printf 'local-buildkit: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

docker_cmd() { "$DOCKER" -H "unix://$SOCKET" "$@"; }

engine_responds() { [ -S "$SOCKET" ] && docker_cmd version >/dev/null 2>&1; }

require_root() {
    [ "$(id -u)" -eq 0 ] || die "'$1' needs root: run it as root (for example with sudo)"
}

# ---------------------------------------------------------------- install

# Print the mirror URL of the Debian main archive that this machine's apt already uses.
debian_mirror() {
    local url
    url=$(grep -rhsE '^[[:space:]]*URIs:.*/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '{print $2}' | head -n1)
    if [ -z "$url" ]; then
        url=$(grep -rhsE '^[[:space:]]*deb[[:space:]].*/debian/?[[:space:]]' \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | grep -v '\[.*\]' | awk '{print $2}' | head -n1)
    fi
    echo "${url:-http://deb.debian.org/debian}"
}

write_apt_sources() {
    [ -f "$APT_SOURCES" ] && [ -f "$APT_PIN" ] && return 0
    local mirror
    mirror=$(debian_mirror)
    log "adding Debian 13 (trixie) from $mirror as $APT_SOURCES"
    cat >"$APT_SOURCES" <<EOF
# Debian 13 (trixie), only for docker.io, docker-cli and docker-buildx (bkdbg's local BuildKit).
# Written by bkdbg's scripts/local-buildkit.sh. $APT_PIN keeps every other package on Debian 12.
Types: deb
URIs: $mirror
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # priority 1 means no trixie package is ever installed or upgraded unless named as pkg/trixie
    cat >"$APT_PIN" <<EOF
Package: *
Pin: release n=trixie
Pin-Priority: 1
EOF
}

# Print the packages (as apt-get arguments) that are not installed yet.
missing_packages() {
    local codename
    # shellcheck source=/dev/null
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    [ -x /usr/sbin/dockerd ] || echo "docker.io/trixie"
    [ -x /usr/bin/docker ] || echo "docker-cli/trixie"
    [ -x /usr/libexec/docker/cli-plugins/docker-buildx ] || echo "docker-buildx/trixie"
    [ -x /bin/busybox ] || echo "busybox-static"
    # trixie's docker.io accepts containerd >= 1.4 and runc >= 1.0, but apt would take
    # both from trixie too unless the Debian 12 versions are named
    command -v containerd >/dev/null || echo "containerd/$codename"
    command -v runc >/dev/null || echo "runc/$codename"
}

install_packages() {
    local packages
    packages=$(missing_packages)
    [ -n "$packages" ] || return 0

    write_apt_sources
    log "installing: $(tr '\n' ' ' <<<"$packages")"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    # A policy-rc.d that exits 101 keeps the packages' postinst from starting the
    # distribution's docker service on the default socket. An existing one is left as it is.
    local policy=/usr/sbin/policy-rc.d added_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        added_policy=1
    fi
    # shellcheck disable=SC2086  # one package argument per word
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $packages; then
        [ -z "$added_policy" ] || rm -f "$policy"
        die "apt-get install failed: see the output above"
    fi
    [ -z "$added_policy" ] || rm -f "$policy"
}

# ---------------------------------------------------------------- engine

# Print the pid in the pid file if that process is a running dockerd.
running_pid() {
    local pid
    [ -f "$PID_FILE" ] || return 1
    pid=$(cat "$PID_FILE" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] || return 1
    echo "$pid"
}

start_engine() {
    if engine_responds; then
        log "engine already responds at unix://$SOCKET"
        return 0
    fi
    if running_pid >/dev/null; then
        log "dockerd (pid $(running_pid)) is running but does not respond yet; waiting"
    else
        launch_dockerd
    fi
    wait_for_engine
}

launch_dockerd() {
    mkdir -p "$STATE_DIR" "$EXEC_ROOT" "$DATA_ROOT" "$LOG_DIR"
    # an empty config file of our own keeps /etc/docker/daemon.json out of this engine
    [ -f "$CONFIG_FILE" ] || echo '{}' >"$CONFIG_FILE"
    rm -f "$SOCKET"

    # dockerd starts and stops its own containerd (under $EXEC_ROOT/containerd) when none
    # runs at /run/containerd/containerd.sock. setsid detaches it from the caller's
    # session, so it outlives the shell that ran `start`.
    log "starting dockerd, log in $LOG_FILE"
    # dockerd keeps runc's process state under the caller's XDG_RUNTIME_DIR, so a test's
    # temporary one would break every build once it is removed. The engine therefore
    # gets none of the caller's XDG dirs, and root's own HOME.
    setsid env -u XDG_RUNTIME_DIR -u XDG_DATA_HOME -u XDG_CONFIG_HOME -u XDG_STATE_HOME \
        -u XDG_CACHE_HOME HOME=/root /usr/sbin/dockerd \
        --host "unix://$SOCKET" \
        --data-root "$DATA_ROOT" \
        --exec-root "$EXEC_ROOT" \
        --pidfile "$PID_FILE" \
        --config-file "$CONFIG_FILE" \
        --iptables=false --ip6tables=false \
        </dev/null >>"$LOG_FILE" 2>&1 &
    echo $! >"$STATE_DIR/launched.pid"
}

# Succeed while the dockerd that `start` launched runs, including before it writes its pid file.
dockerd_alive() {
    local launched
    running_pid >/dev/null && return 0
    launched=$(cat "$STATE_DIR/launched.pid" 2>/dev/null) || return 1
    [ -n "$launched" ] && kill -0 "$launched" 2>/dev/null
}

wait_for_engine() {
    local deadline=$((SECONDS + START_TIMEOUT))
    until engine_responds; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 20 "$LOG_FILE" >&2 || true
            die "engine did not respond at unix://$SOCKET within ${START_TIMEOUT}s: see $LOG_FILE"
        fi
        if ! dockerd_alive; then
            tail -n 20 "$LOG_FILE" >&2 || true
            die "dockerd exited during start: see $LOG_FILE"
        fi
        sleep 0.5
    done
    log "engine responds at unix://$SOCKET"
}

stop_engine() {
    local pid
    if ! pid=$(running_pid); then
        log "engine is not running (no live dockerd in $PID_FILE)"
        return 0
    fi
    log "stopping dockerd (pid $pid)"
    kill -TERM "$pid"
    local deadline=$((SECONDS + STOP_TIMEOUT))
    while [ -d "/proc/$pid" ]; do
        [ "$SECONDS" -lt "$deadline" ] || die "dockerd (pid $pid) did not exit within ${STOP_TIMEOUT}s"
        sleep 0.2
    done
    rm -f "$STATE_DIR/launched.pid"
    log "stopped"
}

# ---------------------------------------------------------------- test image

# Build the rootfs of the test image in $1: busybox with its applet links, users and dirs.
make_rootfs() {
    local root=$1 applet
    mkdir -p "$root/bin" "$root/etc" "$root/root" "$root/tmp"
    chmod 1777 "$root/tmp"
    chmod 700 "$root/root"
    cp /bin/busybox "$root/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
        >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
}

create_test_image() {
    if docker_cmd image inspect "$TEST_IMAGE" >/dev/null 2>&1; then
        log "image $TEST_IMAGE already present"
        return 0
    fi
    local work
    work=$(mktemp -d)
    make_rootfs "$work/rootfs"
    tar --numeric-owner --owner=0 --group=0 -C "$work/rootfs" -cf - . \
        | docker_cmd import \
            --change 'CMD ["/bin/sh"]' \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            - "$TEST_IMAGE" >/dev/null
    rm -rf "$work"
    log "created image $TEST_IMAGE"
}

# ---------------------------------------------------------------- commands

cmd_start() {
    require_root start
    install_packages
    start_engine
    create_test_image
}

cmd_status() {
    local version
    if version=$(docker_cmd version --format '{{.Server.Version}}' 2>/dev/null); then
        echo "engine: up"
        echo "version: Docker Engine $version"
        echo "address: $ADDRESS"
        return 0
    fi
    echo "engine: down (start it with scripts/local-buildkit.sh start)"
    echo "address: $ADDRESS"
    return 3
}

cmd_env() {
    echo "export BUILDKIT_HOST=$ADDRESS"
    echo "export BKDBG_TEST_ADDR=$ADDRESS"
}

main() {
    case "${1:-}" in
        start) cmd_start ;;
        stop) require_root stop; stop_engine ;;
        status) cmd_status ;;
        env) cmd_env ;;
        *)
            echo "usage: $0 start|stop|status|env" >&2
            exit 2
            ;;
    esac
}

main "$@"
