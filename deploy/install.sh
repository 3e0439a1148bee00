#!/bin/sh
# Install lungedge as a service on Raspberry Pi OS 64-bit (Debian bookworm, Python 3.11).
# Run as root from a checkout:   sudo deploy/install.sh
# Only the Python environment (what the test suite checks in a clean venv):
#   PREFIX=/tmp/x deploy/install.sh --venv-only
set -eu
SOURCE=${SOURCE:-$(cd "$(dirname "$0")/.." && pwd)}
PREFIX=${PREFIX:-/opt/lungedge}
EXTRAS=${EXTRAS:-edge,serve,dicom}

python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --quiet "$SOURCE[$EXTRAS]"
"$PREFIX/venv/bin/lungedge" --version
[ "${1:-}" = "--venv-only" ] && exit 0

id lungedge >/dev/null 2>&1 || useradd --system --home-dir /var/lib/lungedge --shell /usr/sbin/nologin lungedge
install -d -m 0750 -o lungedge -g lungedge /var/lib/lungedge
install -d -m 0755 /etc/lungedge
if [ ! -e /etc/lungedge/lungedge.env ]; then
    token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    sed "s/^LUNGEDGE_TOKEN=.*/LUNGEDGE_TOKEN=$token/" "$SOURCE/deploy/lungedge.env" > /etc/lungedge/lungedge.env
fi
chown root:lungedge /etc/lungedge/lungedge.env
chmod 0640 /etc/lungedge/lungedge.env
sed "s#/opt/lungedge/venv#$PREFIX/venv#" "$SOURCE/deploy/lungedge-listen.service" > /etc/systemd/system/lungedge-listen.service
systemctl daemon-reload
echo "next: copy your model to /var/lib/lungedge/model.tflite (owner lungedge), then"
echo "      systemctl enable --now lungedge-listen && journalctl -u lungedge-listen -f"
