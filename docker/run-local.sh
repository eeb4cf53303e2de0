#!/usr/bin/env bash
# Build the CPU image and run the compose setup here, end to end: a switch, a rendezvous and
# WORLD_SIZE workers for a few steps of every method; then check the results folder and merge it
# with `switchagg report`. Uses podman (or docker where an engine answers).
#
#   docker/run-local.sh                    # build + run (WORLD_SIZE=4, MAX_STEPS=5, every method)
#   STEP=build docker/run-local.sh         # only build the image
#   STEP=run docker/run-local.sh           # only run (image already built)
#
# Where no image registry is reachable, the base image is made here: debootstrap writes a minimal
# Debian 12 with python3, the host's CA bundle is copied in (so pip verifies TLS through whatever
# proxy the host trusts), and `podman import` turns it into localhost/switchagg-base:bookworm.
# torch comes from TORCH_WHEELS (a folder with the torch 2.13.0 CPU wheel, mounted into the build)
# when set or when /opt/wheels holds it; else from PyTorch's CPU index. Everything else from PyPI
# at the versions of docker/constraints.txt.
#
# podman without systemd (containers here) has no health checks: compose does not require one (the
# workers wait for the switch with their own probe). Where podman cannot set the default rlimits
# or use crun's cgroup mode, a containers.conf written here picks runc and the host's limits.
# Compose runs through podman's docker-compatible socket with docker-compose (1.29 from Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STEP=${STEP:-all}
WORK=${WORK:-/tmp/switchagg-run-local}
IMAGE=switchagg:cpu
BASE=localhost/switchagg-base:bookworm
export WORLD_SIZE=${WORLD_SIZE:-4} MAX_STEPS=${MAX_STEPS:-5} EPOCHS=${EPOCHS:-1}
export RESULTS_DIR=${RESULTS_DIR:-$WORK/results}
mkdir -p "$WORK"
log() { echo "run-local: $*" >&2; }

if command -v docker > /dev/null && docker info > /dev/null 2>&1; then
  ENGINE=docker
elif command -v podman > /dev/null; then
  ENGINE=podman
else
  log "neither a docker engine nor podman here (apt-get install podman debootstrap docker-compose)"
  exit 2
fi

if [ "$ENGINE" = podman ]; then
  # Limits podman would set that this host refuses (a VM or a container), and crun's cgroup mode.
  export CONTAINERS_CONF=$WORK/containers.conf
  cat > "$CONTAINERS_CONF" <<CONF
[containers]
default_ulimits = ["nofile=$(ulimit -Sn):$(ulimit -Hn)", "nproc=4096:4096"]
[engine]
runtime = "runc"
CONF
fi

build() {
  local started=$SECONDS base_arg=() torch_args=() volume=()
  if [ "$ENGINE" = podman ] && ! timeout 10 podman pull -q docker.io/library/python:3.11.11-slim-bookworm \
      > /dev/null 2>&1; then
    if ! podman image exists "$BASE"; then
      log "no registry reachable: making $BASE with debootstrap"
      local rootfs=$WORK/rootfs
      if [ ! -x "$rootfs/usr/bin/python3" ]; then
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
          bookworm "$rootfs" http://deb.debian.org/debian > "$WORK/debootstrap.log"
      fi
      cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
      tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" > /dev/null
    fi
    base_arg=(--build-arg "BASE_IMAGE=$BASE")
  fi
  local wheels=${TORCH_WHEELS:-/opt/wheels}
  if ls "$wheels"/torch-2.13.0+cpu-*.whl > /dev/null 2>&1; then
    torch_args=(--build-arg TORCH_FIND_LINKS=/wheels)
    volume=(--volume "$wheels:/wheels:ro")
  fi
  log "building $IMAGE with $ENGINE"
  "$ENGINE" build "${base_arg[@]}" "${torch_args[@]}" "${volume[@]}" -f docker/Dockerfile -t "$IMAGE" . \
    > "$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
  log "built $IMAGE in $((SECONDS - started)) s (log: $WORK/build.log)"
}

run() {
  # Every method the image knows, unless METHODS says otherwise.
  export METHODS=${METHODS:-$("$ENGINE" run --rm "$IMAGE" python -c \
    "from switchagg.methods import METHODS, OWN_LOOP; print(','.join([*METHODS, *OWN_LOOP]))")}
  local started=$SECONDS
  rm -rf "$RESULTS_DIR" && mkdir -p "$RESULTS_DIR" && chmod 0777 "$RESULTS_DIR"
  local compose=(docker-compose)
  if [ "$ENGINE" = podman ]; then
    local sock=$WORK/podman.sock
    podman system service --time=0 "unix://$sock" > "$WORK/podman-service.log" 2>&1 &
    SERVICE_PID=$!
    trap 'kill $SERVICE_PID 2> /dev/null || true' EXIT
    for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.2; done
    export DOCKER_HOST=unix://$sock
  fi
  log "compose: switch, rendezvous and $WORLD_SIZE workers; methods $METHODS, $MAX_STEPS steps each"
  set +e
  "${compose[@]}" -f docker/compose.yaml -p switchagg-local up --no-build --exit-code-from rendezvous \
    > "$WORK/compose.log" 2>&1
  local rc=$?
  set -e
  "${compose[@]}" -f docker/compose.yaml -p switchagg-local down > /dev/null 2>&1 || true
  log "compose ended with status $rc in $((SECONDS - started)) s (log: $WORK/compose.log)"
  [ $rc -eq 0 ] || { tail -40 "$WORK/compose.log"; exit 1; }
  check
}

check() {
  local missing=0 m r
  for m in ${METHODS//,/ }; do
    for r in $(seq 0 $((WORLD_SIZE - 1))); do
      for f in "metrics/$m.rank$r.jsonl" "summaries/$m.rank$r.json"; do
        [ -s "$RESULTS_DIR/$f" ] || { log "missing $f"; missing=1; }
      done
    done
  done
  [ $missing -eq 0 ] || exit 1
  # The merge runs in the image too: nothing to install on the host.
  "$ENGINE" run --rm --volume "$RESULTS_DIR:/results" "$IMAGE" switchagg report /results
  log "results: $RESULTS_DIR (every method, every rank; merged above)"
}

case $STEP in
  build) build ;;
  run) run ;;
  all) build; run ;;
  *) log "STEP=$STEP: choose build, run or all"; exit 2 ;;
esac
