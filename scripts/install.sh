#!/usr/bin/env bash
# Install everything statelab needs on a fresh Debian 12 / Ubuntu 22.04+ machine. Idempotent:
# run it as often as you like; it only installs what is missing.
#   - Debian packages: Mininet, Open vSwitch, Redis, iproute2, ping, tcpdump, iperf3, ethtool
#   - a virtualenv in .venv (it sees Debian's python3-mininet) with statelab installed editable
#   - /usr/local/bin/statelab
#   - starts Open vSwitch if it is not running (userspace datapath: no kernel module needed)
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root: sudo $0" >&2
    exit 1
fi
top=$(cd "$(dirname "$0")/.." && pwd)
venv="$top/.venv"

packages="mininet openvswitch-switch redis-server iproute2 iputils-ping tcpdump iperf3 ethtool nftables conntrack
          net-tools procps python3 python3-venv python3-pip python3-thrift"
missing=""
for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "install.sh: installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# The P4 targets' switch and compiler (bmv2's simple_switch_grpc, p4c) are in no Debian
# registry. On Ubuntu they come from p4lang's packages (the openSUSE Build Service repository
# that p4lang/tutorials uses); elsewhere the bmv2 target is skipped unless they are on PATH.
# STATELAB_NO_P4=1 skips this step.
if [ "${STATELAB_NO_P4:-0}" != 1 ] && ! command -v simple_switch_grpc >/dev/null 2>&1; then
    . /etc/os-release
    if [ "${ID:-}" = ubuntu ]; then
        repo="https://download.opensuse.org/repositories/home:/p4lang/xUbuntu_${VERSION_ID}"
        echo "install.sh: installing bmv2 and p4c from p4lang's Ubuntu packages ($repo)"
        apt-get install -y -qq --no-install-recommends curl gnupg ca-certificates >/dev/null
        curl -fsSL "$repo/Release.key" | gpg --dearmor > /etc/apt/trusted.gpg.d/home_p4lang.gpg
        echo "deb $repo/ /" > /etc/apt/sources.list.d/home_p4lang.list
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq p4lang-bmv2 p4lang-p4c >/dev/null
    else
        echo "install.sh: bmv2 (simple_switch_grpc) and p4c are not packaged for ${PRETTY_NAME:-this system}:" \
             "the bmv2 target is skipped (Open vSwitch runs everywhere); see docs/targets.md to build them"
    fi
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "install.sh: creating $venv"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
stamp="$venv/.statelab-installed"
if [ ! -f "$stamp" ] || [ "$top/pyproject.toml" -nt "$stamp" ]; then
    echo "install.sh: installing statelab and its Python dependencies into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -e "$top[test]"
    touch "$stamp"
fi
old_link=$(readlink /usr/local/bin/statelab 2>/dev/null || true)
if [ "$old_link" != "$venv/bin/statelab" ]; then
    [ -n "$old_link" ] && echo "install.sh: /usr/local/bin/statelab pointed at $old_link; it now runs this clone ($top)"
    ln -sf "$venv/bin/statelab" /usr/local/bin/statelab
fi

if ! ovs-vsctl -t 2 show >/dev/null 2>&1 || ! ovs-appctl -t ovs-vswitchd version >/dev/null 2>&1; then
    echo "install.sh: starting Open vSwitch"
    /usr/share/openvswitch/scripts/ovs-ctl start --system-id=random >/dev/null
fi
echo "install.sh: ready ($("$venv/bin/python" -c 'import statelab; print("statelab", statelab.__version__)'), $(ovs-vsctl --version | head -1))"
