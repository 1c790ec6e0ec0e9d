#!/usr/bin/env bash
# Remove what deploy/install.sh added: the services (stopped and disabled first when systemd runs), the unit
# files and /opt/gpu-router. The configuration in /etc/gpu-router stays unless --purge, which also removes
# the `gpu-router` user.
set -euo pipefail

UNITS=(gpu-router-exporter.service gpu-router-optimizer.service gpu-router-proxy.service)

usage() {
    cat <<'EOF'
usage: uninstall.sh [--root DIR] [--purge]
  --root DIR   uninstall from DIR instead of / (default /)
  --purge      also remove /etc/gpu-router (the configuration) and the gpu-router user
EOF
}

die() {
    echo "uninstall.sh: $*" >&2
    exit 2
}

root=/
purge=0
while [ $# -gt 0 ]; do
    case $1 in
        --root) [ $# -ge 2 ] || die "--root needs a directory"; root=$2; shift 2 ;;
        --purge) purge=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

[ -d "$root" ] || die "--root $root: no such directory"
root=$(cd "$root" && pwd)
if [ "$root" = / ] && [ "$(id -u)" -ne 0 ]; then
    die "uninstalling from / needs root (or give --root DIR)"
fi
prefix=${root%/}
systemd_runs=0
if [ "$root" = / ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemd_runs=1
fi

if [ "$systemd_runs" = 1 ]; then
    systemctl disable --now "${UNITS[@]}" 2>/dev/null || true
fi
for unit in "${UNITS[@]}"; do
    rm -f "$prefix/etc/systemd/system/$unit"
done
if [ "$systemd_runs" = 1 ]; then
    systemctl daemon-reload
fi
rm -rf "$prefix/opt/gpu-router"
echo "removed the services and $prefix/opt/gpu-router"

if [ "$purge" = 1 ]; then
    rm -rf "$prefix/etc/gpu-router"
    echo "removed $prefix/etc/gpu-router"
    if [ "$root" = / ] && command -v userdel >/dev/null && id gpu-router >/dev/null 2>&1; then
        userdel gpu-router
        echo "removed user gpu-router"
    fi
elif [ -d "$prefix/etc/gpu-router" ]; then
    echo "kept $prefix/etc/gpu-router (--purge removes it)"
fi
