#!/bin/sh
# Build POD's images with podman on a Debian base made here (deploy/images/podman-setup.sh), no Docker Hub needed:
# the `serve`, `train` and `loadtest` targets of the Dockerfile, tagged as docker-compose.yml names them, and
# (for the compose stack) a Prometheus image from Debian's `prometheus` package (deploy/images/Containerfile.prometheus).
# `--format docker`: the OCI format has no HEALTHCHECK (podman drops it with a warning).
# Package index settings reach pip as build secrets only (never in an image): the machine's CA bundle as `pip_ca`,
# and, where the PyTorch index is unreachable but a torch +cpu wheel lies on disk, a pip config (`pip_conf`) with
# `find-links` to that directory, mounted read-only into the build.
# Settings (env): POD_BASE_IMAGE (default localhost/pod-base:bookworm), POD_TAG (0.1.0), POD_TARGETS
# ("serve train loadtest prometheus"), POD_CA_BUNDLE (default: pip's `cert`, $PIP_CERT, $REQUESTS_CA_BUNDLE or
# /etc/ssl/certs/ca-certificates.crt), POD_TORCH_WHEELS (a directory with torch-<version>+cpu wheels; default
# /opt/wheels when it holds one), POD_IMAGES_REPORT (default runs/images/report.json): per target, the image's
# size and build seconds.
set -eu
cd "$(dirname "$0")/../.."

BASE="${POD_BASE_IMAGE:-localhost/pod-base:bookworm}"
TAG="${POD_TAG:-0.1.0}"
TARGETS="${POD_TARGETS:-serve train loadtest prometheus}"
REPORT="${POD_IMAGES_REPORT:-runs/images/report.json}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

podman image exists "$BASE" || { echo "build: no base image $BASE; run deploy/images/podman-setup.sh" >&2; exit 1; }

CA="${POD_CA_BUNDLE:-${PIP_CERT:-${REQUESTS_CA_BUNDLE:-}}}"
if [ -z "$CA" ] && command -v pip >/dev/null 2>&1; then
    CA="$(pip config get global.cert 2>/dev/null || true)"
fi
[ -n "$CA" ] || CA=/etc/ssl/certs/ca-certificates.crt
SECRETS=""
[ -s "$CA" ] && SECRETS="--secret id=pip_ca,src=$CA"

TORCH_ARGS=""
WHEELS="${POD_TORCH_WHEELS:-/opt/wheels}"
if ls "$WHEELS"/torch-*+cpu-*.whl >/dev/null 2>&1; then
    printf '[global]\nfind-links = /wheels\n' >"$TMP/pip.conf"
    TORCH_ARGS="-v $WHEELS:/wheels:ro --secret id=pip_conf,src=$TMP/pip.conf --build-arg TORCH_INDEX_URL=https://pypi.org/simple"
fi

mkdir -p "$(dirname "$REPORT")"
echo "{" >"$TMP/report"
sep=""
for target in $TARGETS; do
    start=$(date +%s)
    case "$target" in
        prometheus)
            image="localhost/pod-rec/prometheus:$TAG"
            # shellcheck disable=SC2086
            podman build --format docker --build-arg "BASE_IMAGE=$BASE" -t "$image" -f deploy/images/Containerfile.prometheus deploy/images
            ;;
        serve | train | loadtest)
            image="localhost/pod-rec/$target:$TAG"
            extra=""
            [ "$target" = train ] && extra="$TORCH_ARGS"
            # shellcheck disable=SC2086  # the option lists are meant to split
            podman build --format docker --build-arg "PYTHON_IMAGE=$BASE" $SECRETS $extra --target "$target" -t "$image" .
            ;;
        serve-gpu)
            echo "build: serve-gpu skipped: its base nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 is on Docker Hub, which this machine cannot reach" >&2
            continue
            ;;
        *)
            echo "build: unknown target $target" >&2
            exit 2
            ;;
    esac
    seconds=$(($(date +%s) - start))
    size=$(podman image inspect --format '{{.Size}}' "$image")
    echo "build: $image $size bytes, ${seconds} s"
    printf '%s  "%s": {"image": "%s", "size_bytes": %s, "build_seconds": %s}' "$sep" "$target" "$image" "$size" "$seconds" >>"$TMP/report"
    sep=",
"
done
printf '\n}\n' >>"$TMP/report"
mv "$TMP/report" "$REPORT"
echo "build: sizes in $REPORT"
