#!/usr/bin/env bash
# End-to-end on a kind cluster: build the image, install MinIO and the
# chart, then exercise filesystem and block PVCs, moving a volume between
# nodes, expansion, snapshots, clones, and deletion down to an empty bucket.
#
#   tests/e2e/kind.sh            run (needs docker, kind, kubectl, helm and
#                                the nbd module on the host: modprobe nbd)
#   tests/e2e/kind.sh --dry-run  print every step without running anything
#   KEEP=1 tests/e2e/kind.sh     keep the cluster afterwards
set -euo pipefail
cd "$(dirname "$0")/../.."

dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
cluster=${CLUSTER:-s3blk-e2e}
image=${IMAGE:-s3blk:e2e}
ns=s3blk-system
snapshotter_version=${SNAPSHOTTER_VERSION:-v8.3.0}
passed=()
failed=()
planned=()

run() {
  echo "+ $*"
  [ "$dry" = 1 ] || "$@"
}

# kubectl apply of an inline manifest.
apply() {
  echo "+ kubectl apply -f - <<'YAML'"
  local doc
  doc=$(cat)
  printf '%s\nYAML\n' "$doc"
  [ "$dry" = 1 ] || printf '%s\n' "$doc" | kubectl apply -f -
}

check() { # name command...
  local name=$1
  shift
  echo "== check: $name"
  if [ "$dry" = 1 ]; then
    echo "+ $*"
    planned+=("$name")
  elif "$@"; then
    passed+=("$name")
  else
    failed+=("$name")
  fi
}

cleanup() {
  if [ "$dry" = 1 ] || [ "${KEEP:-0}" = 1 ]; then return; fi
  kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
}
trap cleanup EXIT

summary() {
  echo
  if [ "$dry" = 1 ]; then
    echo "==== s3blk kind e2e (dry run, nothing was executed): ${#planned[@]} checks"
    for p in "${planned[@]}"; do echo "CHECK $p"; done
    return 0
  fi
  echo "==== s3blk kind e2e: ${#passed[@]} passed, ${#failed[@]} failed"
  for p in "${passed[@]}"; do echo "PASS $p"; done
  for f in "${failed[@]}"; do echo "FAIL $f"; done
  [ "${#failed[@]}" -eq 0 ]
}

if [ "$dry" = 0 ]; then
  for t in docker kind kubectl helm; do
    command -v "$t" >/dev/null || { echo "$t is required" >&2; exit 1; }
  done
  [ -e /sys/module/nbd ] || { echo "load the nbd module on the host first: sudo modprobe nbd nbds_max=64" >&2; exit 1; }
fi

echo "== cluster"
apply_kind_config() {
  cat <<'KIND'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
    extraMounts: [{hostPath: /dev, containerPath: /dev}, {hostPath: /lib/modules, containerPath: /lib/modules, readOnly: true}]
  - role: worker
    extraMounts: [{hostPath: /dev, containerPath: /dev}, {hostPath: /lib/modules, containerPath: /lib/modules, readOnly: true}]
KIND
}
echo "+ kind create cluster --name $cluster --config <(nodes: control-plane + 2 workers with /dev and /lib/modules)"
[ "$dry" = 1 ] || kind create cluster --name "$cluster" --config <(apply_kind_config) --wait 120s

echo "== image"
run docker build -t "$image" .
run kind load docker-image "$image" --name "$cluster"

echo "== snapshot CRDs and controller"
base=https://raw.githubusercontent.com/kubernetes-csi/external-snapshotter/$snapshotter_version
for crd in snapshot.storage.k8s.io_volumesnapshotclasses snapshot.storage.k8s.io_volumesnapshotcontents snapshot.storage.k8s.io_volumesnapshots; do
  run kubectl apply -f "$base/client/config/crd/$crd.yaml"
done
run kubectl apply -f "$base/deploy/kubernetes/snapshot-controller/rbac-snapshot-controller.yaml"
run kubectl apply -f "$base/deploy/kubernetes/snapshot-controller/setup-snapshot-controller.yaml"

echo "== MinIO"
run kubectl create namespace "$ns"
apply <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: {name: minio, namespace: $ns}
spec:
  selector: {matchLabels: {app: minio}}
  template:
    metadata: {labels: {app: minio}}
    spec:
      containers:
        - name: minio
          image: quay.io/minio/minio:latest
          args: [server, /data]
          env: [{name: MINIO_ROOT_USER, value: s3blk}, {name: MINIO_ROOT_PASSWORD, value: s3blk-secret}]
          ports: [{containerPort: 9000}]
          readinessProbe: {httpGet: {path: /minio/health/ready, port: 9000}}
---
apiVersion: v1
kind: Service
metadata: {name: minio, namespace: $ns}
spec: {selector: {app: minio}, ports: [{port: 9000}]}
YAML
run kubectl -n "$ns" rollout status deploy/minio --timeout=180s
mc() { run kubectl -n "$ns" exec deploy/minio -- sh -c "mc alias set local http://localhost:9000 s3blk s3blk-secret >/dev/null && mc $*"; }
mc mb local/volumes

echo "== chart"
run helm install s3blk charts/s3blk -n "$ns" --wait --timeout 5m \
  --set image.repository="${image%:*}" --set image.tag="${image#*:}" --set image.pullPolicy=Never \
  --set store.bucket=volumes --set s3.endpoint="http://minio.$ns:9000" \
  --set s3.accessKeyID=s3blk --set s3.secretAccessKey=s3blk-secret

workers=("${cluster}-worker" "${cluster}-worker2")

pod() { # name node pvc mode(fs|block) command
  apply <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  nodeName: $2
  restartPolicy: Never
  containers:
    - name: c
      image: busybox:1.36
      command: [sh, -c, "$5"]
      $( [ "$4" = block ] && echo "volumeDevices: [{name: v, devicePath: /dev/xvda}]" || echo "volumeMounts: [{name: v, mountPath: /data}]" )
  volumes: [{name: v, persistentVolumeClaim: {claimName: $3}}]
YAML
}
pvc() { # name size mode [dataSource-yaml]
  apply <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: s3blk
  volumeMode: $3
  resources: {requests: {storage: $2}}
  ${4:-}
YAML
}
done_ok() { run kubectl wait --for=jsonpath='{.status.phase}'=Succeeded "pod/$1" --timeout=300s; }

echo "== filesystem PVC moves between nodes"
pvc data 1Gi Filesystem
pod writer "${workers[0]}" data fs 'echo hello-s3blk > /data/hello && sync'
check "filesystem write on ${workers[0]}" done_ok writer
run kubectl delete pod writer --wait
pod reader "${workers[1]}" data fs 'grep -q hello-s3blk /data/hello'
check "filesystem read on ${workers[1]}" done_ok reader
run kubectl delete pod reader --wait

echo "== raw block PVC"
pvc raw 256Mi Block
pod blockw "${workers[0]}" raw block 'echo block-data | dd of=/dev/xvda bs=4096 conv=fsync && dd if=/dev/xvda bs=10 count=1 | grep -q block-data'
check "raw block write and read" done_ok blockw
run kubectl delete pod blockw --wait

echo "== expansion"
run kubectl patch pvc data -p '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}'
# shellcheck disable=SC2016 # expanded by the shell inside the pod
pod grown "${workers[0]}" data fs 'df -k /data | awk "NR==2 {exit !(\$2 > 1500000)}"'
check "filesystem grew to 2Gi" done_ok grown
run kubectl delete pod grown --wait

echo "== snapshot, restore, clone"
apply <<YAML
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: data-snap}
spec: {volumeSnapshotClassName: s3blk, source: {persistentVolumeClaimName: data}}
YAML
run kubectl wait --for=jsonpath='{.status.readyToUse}'=true volumesnapshot/data-snap --timeout=120s
pvc restored 2Gi Filesystem "dataSource: {name: data-snap, kind: VolumeSnapshot, apiGroup: snapshot.storage.k8s.io}"
pod rreader "${workers[1]}" restored fs 'grep -q hello-s3blk /data/hello'
check "snapshot restores the data" done_ok rreader
pvc cloned 2Gi Filesystem "dataSource: {name: data, kind: PersistentVolumeClaim}"
pod creader "${workers[0]}" cloned fs 'grep -q hello-s3blk /data/hello'
check "clone has the data" done_ok creader

echo "== delete everything; the bucket must hold no volume objects"
run kubectl delete pod rreader creader --wait
run kubectl delete volumesnapshot data-snap --wait
run kubectl delete pvc data raw restored cloned --wait
bucket_empty() {
  local left
  for _ in $(seq 60); do
    left=$(kubectl -n "$ns" exec deploy/minio -- sh -c "mc alias set local http://localhost:9000 s3blk s3blk-secret >/dev/null && mc ls --recursive local/volumes/kubernetes/ | grep -v -e '/_snapshots/' -e '[.]s3blk-store[.]json' | wc -l")
    [ "$left" = 0 ] && return 0
    sleep 5
  done
  echo "objects left in the bucket: $left"
  return 1
}
check "bucket holds no objects of deleted volumes" bucket_empty

summary
