#!/usr/bin/env bash
# Install GPU Router as three systemd services (gpu-router-exporter, gpu-router-optimizer, gpu-router-proxy):
#   a virtual environment in /opt/gpu-router/venv with the project pip-installed into it,
#   /etc/gpu-router/config.yaml from examples/gpu_router_config.yaml (only when none exists),
#   the unit files in /etc/systemd/system, and a system user `gpu-router`.
# With --root DIR everything goes under DIR instead (a staging tree; no user, no systemctl), and the units
# are enabled and started only when DIR is / and systemd runs. Undo with deploy/uninstall.sh.
set -euo pipefail

UNITS=(gpu-router-exporter.service gpu-router-optimizer.service gpu-router-proxy.service)

usage() {
    cat <<'EOF'
usage: install.sh [--root DIR] [--source DIR] [--no-enable] [--system-site-packages]
  --root DIR               install under DIR instead of / (default /)
  --source DIR             the GPU Router project to install (default: this script's repository)
  --no-enable              do not enable and start the services
  --system-site-packages   let the virtual environment use the system's Python packages
EOF
}

die() {
    echo "install.sh: $*" >&2
    exit 2
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=/
source_dir=$(dirname "$here")
enable=1
venv_options=()
while [ $# -gt 0 ]; do
    case $1 in
        --root) [ $# -ge 2 ] || die "--root needs a directory"; root=$2; shift 2 ;;
        --source) [ $# -ge 2 ] || die "--source needs a directory"; source_dir=$2; shift 2 ;;
        --no-enable) enable=0; shift ;;
        --system-site-packages) venv_options+=(--system-site-packages); shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

[ -d "$root" ] || die "--root $root: no such directory"
root=$(cd "$root" && pwd)
[ -f "$source_dir/pyproject.toml" ] || die "--source $source_dir: no pyproject.toml there"
source_dir=$(cd "$source_dir" && pwd)
example="$source_dir/examples/gpu_router_config.yaml"
[ -f "$example" ] || die "$example: missing (the configuration to start from)"
for unit in "${UNITS[@]}"; do
    [ -f "$source_dir/deploy/systemd/$unit" ] || die "$source_dir/deploy/systemd/$unit: missing"
done
if [ "$root" = / ] && [ "$(id -u)" -ne 0 ]; then
    die "installing into / needs root (or give --root DIR)"
fi

prefix=${root%/}
venv="$prefix/opt/gpu-router/venv"
etc="$prefix/etc/gpu-router"
unit_dir="$prefix/etc/systemd/system"

if [ "$root" = / ] && command -v useradd >/dev/null && ! id gpu-router >/dev/null 2>&1; then
    echo "creating system user gpu-router"
    useradd --system --no-create-home --home-dir /nonexistent --shell "$(command -v nologin || echo /usr/sbin/nologin)" gpu-router
fi

echo "installing $source_dir into $venv"
mkdir -p "$(dirname "$venv")"
python3 -m venv "${venv_options[@]}" "$venv"
# Build from a clean copy, so that pip's build files never land in the source tree.
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
tar -C "$source_dir" --exclude=.git --exclude=build --exclude='*.egg-info' --exclude='.venv' --exclude=venv \
    --exclude=__pycache__ -cf - . | tar -C "$build" -xf -
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$build"

install -d -m 755 "$etc"
if [ -e "$etc/config.yaml" ]; then
    echo "keeping $etc/config.yaml"
else
    echo "writing $etc/config.yaml from examples/gpu_router_config.yaml: edit its nodes"
    install -m 640 "$example" "$etc/config.yaml"
    if [ "$root" = / ] && getent group gpu-router >/dev/null; then
        chgrp gpu-router "$etc/config.yaml"
    fi
fi

install -d -m 755 "$unit_dir"
for unit in "${UNITS[@]}"; do
    install -m 644 "$source_dir/deploy/systemd/$unit" "$unit_dir/$unit"
done

if [ "$root" = / ] && [ "$enable" = 1 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload
    systemctl enable --now "${UNITS[@]}"
    echo "started ${UNITS[*]} (journalctl -u gpu-router-exporter -u gpu-router-optimizer)"
else
    echo "installed; to start: systemctl daemon-reload && systemctl enable --now ${UNITS[*]}"
fi
