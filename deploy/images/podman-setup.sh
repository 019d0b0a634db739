#!/bin/sh
# Make this machine able to build and run POD's images without Docker Hub (issue 17): Debian's podman (runc, the
# cgroupfs manager, no default ulimits) and a Debian bookworm base image made from the Debian mirror with
# debootstrap, imported as $POD_BASE_IMAGE. Idempotent: what is there is kept (the base is rebuilt only when
# missing, or with POD_REBUILD_BASE=1). Run as root.
# Settings (env): POD_BASE_IMAGE (default localhost/pod-base:bookworm), POD_IMAGES_WORK (default
# /var/tmp/pod-images, where the rootfs is made), DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -eu

BASE="${POD_BASE_IMAGE:-localhost/pod-base:bookworm}"
WORK="${POD_IMAGES_WORK:-/var/tmp/pod-images}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

need=""
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || need="$need $tool"
done
if [ -n "$need" ]; then
    echo "podman-setup: installing podman, runc, debootstrap from the Debian archive"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        podman runc debootstrap netavark aardvark-dns iptables catatonit uidmap slirp4netns fuse-overlayfs
fi

# crun fails on the hybrid (v1 + unified) cgroup layout of these machines and the default ulimits are refused.
CONF=/etc/containers/containers.conf
if [ ! -f "$CONF" ]; then
    mkdir -p /etc/containers
    cat >"$CONF" <<'CONFEOF'
# Written by POD's deploy/images/podman-setup.sh: crun fails on this machine's hybrid cgroup layout and the
# default ulimits are refused, so runc, the cgroupfs manager and no default ulimits.
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
CONFEOF
    echo "podman-setup: wrote $CONF"
else
    grep -q 'runtime *= *"runc"' "$CONF" || echo "podman-setup: warning: $CONF does not select runc" >&2
fi

if podman image exists "$BASE" && [ "${POD_REBUILD_BASE:-0}" != 1 ]; then
    echo "podman-setup: base image $BASE is there"
    exit 0
fi

echo "podman-setup: making $BASE (debootstrap --variant=minbase bookworm from $MIRROR)"
rm -rf "$WORK/rootfs"
mkdir -p "$WORK"
debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
# the point releases and security fixes too, as the official images have them; no package cache in the image
cat >"$WORK/rootfs/etc/apt/sources.list" <<SRCEOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SRCEOF
rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/* "$WORK"/rootfs/var/log/*.log
tar -C "$WORK/rootfs" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
rm -rf "$WORK/rootfs"
echo "podman-setup: $BASE is $(podman image inspect --format '{{.Size}}' "$BASE") bytes"
