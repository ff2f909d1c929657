#!/usr/bin/env bash
# End-to-end on a kind cluster: build the image, install MinIO and the
# chart, then exercise filesystem and block PVCs, moving volumes and their
# data between nodes, expansion, snapshots, clones, and deletion down to an
# empty bucket.
#
#   tests/e2e/kind.sh            run (needs Linux, docker, kind, kubectl, helm
#                                and the nbd module on the host: modprobe nbd)
#   tests/e2e/kind.sh --dry-run  print every step and every manifest without
#                                running anything
#   KEEP=1 tests/e2e/kind.sh     keep the cluster afterwards (a later run
#                                refuses to start until it is deleted)
#
# Overrides: CLUSTER, IMAGE (repo[:tag], registry ports allowed), KIND_NODE_IMAGE,
# MINIO_IMAGE, SNAPSHOTTER_VERSION, ARTIFACTS (where logs go on failure).
set -euo pipefail
cd "$(dirname "$0")/../.."

dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
cluster=${CLUSTER:-s3blk-e2e}
image=${IMAGE:-s3blk:e2e}
ns=s3blk-system
# The lowest Kubernetes the chart supports (Chart.yaml kubeVersion).
kind_node_image=${KIND_NODE_IMAGE:-kindest/node:v1.30.13}
# Conditional writes (If-None-Match) are what s3blk's fencing rests on.
minio_image=${MINIO_IMAGE:-quay.io/minio/minio:RELEASE.2025-04-22T22-12-26Z}
snapshotter_version=${SNAPSHOTTER_VERSION:-v8.3.0}
bucket=volumes
store_prefix=kubernetes
# The store marker s3blk writes at the store root; nothing else may remain.
store_marker="$store_prefix/.s3blk-store.json"
artifacts=${ARTIFACTS:-${TMPDIR:-/tmp}/s3blk-e2e-$cluster}
passed=()
failed=()
planned=()
step=start
created=0
finished=0

# Image reference split into repository and tag: the tag is what follows the
# last ':' of the last path component (a registry's port is not a tag).
image_last=${image##*/}
if [[ $image_last == *:* ]]; then
  image_repo=${image%:*}
  image_tag=${image_last##*:}
else
  image_repo=$image
  image_tag=latest
fi

section() {
  step=$1
  echo "== $1"
}

run() {
  echo "+ $*"
  [ "$dry" = 1 ] || "$@"
}

# kubectl apply of an inline manifest (printed whole in a dry run).
apply() {
  echo "+ kubectl apply -f - <<'YAML'"
  local doc
  doc=$(cat)
  printf '%s\nYAML\n' "$doc"
  [ "$dry" = 1 ] || printf '%s\n' "$doc" | kubectl apply -f -
}

# A one-line string as a YAML double-quoted scalar.
yq() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
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
    echo "check failed: $name" >&2
    failed+=("$name")
  fi
}

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

# What a failed run leaves for the post-mortem.
diagnose() {
  [ "$created" = 1 ] || return 0
  mkdir -p "$artifacts"
  echo "collecting diagnostics in $artifacts" >&2
  kind export logs "$artifacts/kind" --name "$cluster" >/dev/null 2>&1 || echo "kind export logs failed" >&2
  {
    echo "### pods"
    kubectl get pods -A -o wide
    echo "### events"
    kubectl get events -A --sort-by=.lastTimestamp
    echo "### volumeattachments"
    kubectl get volumeattachments -o wide
    kubectl describe volumeattachments
    echo "### pvc, pv, volumesnapshots"
    kubectl get pvc,pv -A -o wide
    kubectl get volumesnapshots,volumesnapshotcontents -A
  } >"$artifacts/cluster.txt" 2>&1 || true
  kubectl -n "$ns" logs -l app.kubernetes.io/name=s3blk --all-containers --prefix --tail=-1 --max-log-requests=20 \
    >"$artifacts/driver.log" 2>&1 || true
  # The most telling part on the terminal too.
  tail -n 60 "$artifacts/cluster.txt" >&2 || true
  grep -E 'ERROR|WARN' "$artifacts/driver.log" | tail -n 40 >&2 || true
}

finish() {
  local rc=$?
  if [ "$dry" = 0 ]; then
    if [ "$rc" != 0 ] && [ "$finished" = 0 ]; then
      echo "==== s3blk kind e2e aborted at $step (exit $rc)" >&2
      diagnose
      summary || true
    elif [ "$rc" != 0 ]; then
      diagnose
    fi
    # Only a cluster this run created is deleted.
    if [ "$created" = 1 ] && [ "${KEEP:-0}" != 1 ]; then
      kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
    elif [ "$created" = 1 ]; then
      echo "KEEP=1: cluster $cluster kept; delete it with: kind delete cluster --name $cluster" >&2
    fi
  fi
  exit "$rc"
}
trap finish EXIT

section "host checks"
if [ "$dry" = 0 ]; then
  for t in docker kind kubectl helm; do
    command -v "$t" >/dev/null || { echo "$t is required" >&2; exit 1; }
  done
  [ "$(uname -s)" = Linux ] || { echo "kind nodes use the host's kernel and its nbd module: run this on Linux" >&2; exit 1; }
  kernel=$(uname -r)
  echo "host kernel $kernel"
  if [ ! -e /sys/module/nbd ] || [ ! -e /dev/nbd0 ]; then
    echo "the nbd module is not loaded on the host (kind nodes share its kernel): sudo modprobe nbd nbds_max=64" >&2
    exit 1
  fi
  major=${kernel%%.*}
  minor=${kernel#*.}
  minor=${minor%%[!0-9]*}
  if [ "$major" -lt 6 ] || { [ "$major" = 6 ] && [ "$minor" -lt 4 ]; }; then
    echo "note: kernel $kernel < 6.4: kind nodes have their own network namespace, so the node plugin attaches" \
      "through NBD ioctls (no nbd netlink outside the initial namespace before 6.4)"
  fi
  if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
    echo "a kind cluster named $cluster already exists (left by KEEP=1?); delete it first:" \
      "kind delete cluster --name $cluster   (or run with CLUSTER=another-name)" >&2
    exit 1
  fi
fi

section "image"
run docker build -t "$image" .

section "cluster"
kind_config() {
  # kind mounts /lib/modules read-only on its own; the node plugin needs the
  # host's /dev for the nbd devices.
  cat <<KIND
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
    image: $kind_node_image
  - role: worker
    image: $kind_node_image
    extraMounts: [{hostPath: /dev, containerPath: /dev}]
  - role: worker
    image: $kind_node_image
    extraMounts: [{hostPath: /dev, containerPath: /dev}]
KIND
}
echo "+ kind create cluster --name $cluster --wait 180s --config=- <<'KIND'"
printf '%s\nKIND\n' "$(kind_config)"
if [ "$dry" = 0 ]; then
  created=1
  kind_config | kind create cluster --name "$cluster" --wait 180s --config=-
fi

section "load image"
load_image() {
  kind load docker-image "$image" --name "$cluster" && return 0
  # With Docker's containerd image store `kind load docker-image` can fail;
  # an archive goes through another path.
  echo "kind load docker-image failed; loading through docker save" >&2
  local tmp
  tmp=$(mktemp -d)
  docker save -o "$tmp/image.tar" "$image" && kind load image-archive "$tmp/image.tar" --name "$cluster"
  local rc=$?
  rm -rf "$tmp"
  return "$rc"
}
echo "+ kind load docker-image $image --name $cluster || { docker save -o TMP/image.tar $image && kind load image-archive TMP/image.tar --name $cluster; }"
[ "$dry" = 1 ] || load_image

section "snapshot CRDs and controller"
base=https://raw.githubusercontent.com/kubernetes-csi/external-snapshotter/$snapshotter_version
for crd in snapshot.storage.k8s.io_volumesnapshotclasses snapshot.storage.k8s.io_volumesnapshotcontents snapshot.storage.k8s.io_volumesnapshots; do
  run kubectl apply -f "$base/client/config/crd/$crd.yaml"
done
run kubectl apply -f "$base/deploy/kubernetes/snapshot-controller/rbac-snapshot-controller.yaml"
run kubectl apply -f "$base/deploy/kubernetes/snapshot-controller/setup-snapshot-controller.yaml"
run kubectl -n kube-system rollout status deploy/snapshot-controller --timeout=180s

section "MinIO"
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
          image: $minio_image
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
# mc inside the MinIO pod; its exit status is the command's.
mc() { kubectl -n "$ns" exec deploy/minio -- sh -c "mc alias set local http://localhost:9000 s3blk s3blk-secret >/dev/null && mc $*"; }
run mc mb "local/$bucket"

section "chart"
# A short compaction interval so deleted volumes kept for their dependants
# are reaped within the run; the safety age is the shortest safe beside
# live writers (2m).
run helm install s3blk charts/s3blk -n "$ns" --wait --timeout 5m \
  --set image.repository="$image_repo" --set image.tag="$image_tag" --set image.pullPolicy=Never \
  --set store.bucket="$bucket" --set store.prefix="$store_prefix" --set s3.endpoint="http://minio.$ns:9000" \
  --set s3.accessKeyID=s3blk --set s3.secretAccessKey=s3blk-secret \
  --set controller.compaction.interval=15s --set controller.compaction.safetyAge=120s

workers=("${cluster}-worker" "${cluster}-worker2")

pod() { # name node pvc mode(fs|block) command
  local mount
  if [ "$4" = block ]; then
    mount="volumeDevices: [{name: v, devicePath: /dev/xvda}]"
  else
    mount="volumeMounts: [{name: v, mountPath: /data}]"
  fi
  apply <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  nodeName: $2
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
    - name: c
      image: busybox:1.36
      command: [sh, -c, $(yq "$5")]
      $mount
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

declare -A sums
# Wait until a data pod has done its work and logged a sha256 (it then sleeps,
# keeping its volume attached): it fails at once when the pod ends (Failed,
# or Succeeded without a sum), with the pod's logs. The sum is remembered.
pod_logged() { # name [seconds]
  local phase="" sum="" i
  for ((i = 0; i < ${2:-300}; i += 2)); do
    phase=$(kubectl get pod "$1" -o jsonpath='{.status.phase}')
    if [ "$phase" = Running ]; then
      sum=$(kubectl logs "$1" | tail -n 1 | cut -d' ' -f1)
      if [[ $sum =~ ^[0-9a-f]{64}$ ]]; then
        sums[$1]=$sum
        return 0
      fi
    fi
    case $phase in
      Succeeded | Failed) break ;;
    esac
    sleep 2
  done
  echo "pod $1 is ${phase:-missing} without a checksum" >&2
  kubectl logs "$1" >&2 || true
  kubectl describe pod "$1" | tail -n 20 >&2 || true
  return 1
}
pod_running() { # name [seconds]
  local phase="" i
  for ((i = 0; i < ${2:-300}; i += 2)); do
    phase=$(kubectl get pod "$1" -o jsonpath='{.status.phase}')
    case $phase in
      Running) return 0 ;;
      Succeeded | Failed) break ;;
    esac
    sleep 2
  done
  echo "pod $1 is $phase, not Running" >&2
  kubectl describe pod "$1" | tail -n 20 >&2 || true
  return 1
}
delete() { # kind/name... (waits, bounded)
  run kubectl delete "$@" --wait --timeout=180s
}
pv_of() { kubectl get pvc "$1" -o jsonpath='{.spec.volumeName}'; }
# The nodes a PV is attached to (VolumeAttachments), one a line.
attached_nodes() {
  kubectl get volumeattachments -o \
    jsonpath="{range .items[?(@.spec.source.persistentVolumeName==\"$1\")]}{.spec.nodeName}{\"\\n\"}{end}"
}
detached_from() { # pvc node
  local pv i
  pv=$(pv_of "$1")
  for ((i = 0; i < 120; i += 2)); do
    attached_nodes "$pv" | grep -qx "$2" || return 0
    sleep 2
  done
  echo "$1 ($pv) still attached to $2" >&2
  return 1
}
attached_to() { # pvc node
  local pv i
  pv=$(pv_of "$1")
  for ((i = 0; i < 120; i += 2)); do
    [ "$(kubectl get volumeattachments -o jsonpath="{range .items[?(@.spec.source.persistentVolumeName==\"$pv\")]}{.spec.nodeName}={.status.attached}{\"\\n\"}{end}" | grep -cx "$2=true")" = 1 ] && return 0
    sleep 2
  done
  echo "$1 ($pv) not attached to $2; attachments: $(attached_nodes "$pv" | tr '\n' ' ')" >&2
  return 1
}
# The checksums two pods logged are the same.
same_sum() { # pod-a pod-b
  local a=${sums[$1]:-} b=${sums[$2]:-}
  echo "$1: ${a:-none}  $2: ${b:-none}"
  [ -n "$a" ] && [ "$a" = "$b" ]
}

mib=8
section "filesystem PVC moves between nodes"
pvc data 1Gi Filesystem
pod writer "${workers[0]}" data fs "head -c $((mib << 20)) /dev/urandom > /data/random && echo hello-s3blk > /data/hello && sync && sha256sum /data/random && exec sleep 3600"
check "filesystem write on ${workers[0]}" pod_logged writer
check "data attached to ${workers[0]}" attached_to data "${workers[0]}"
delete pod writer
check "data detached from ${workers[0]}" detached_from data "${workers[0]}"
pod reader "${workers[1]}" data fs "grep -qx hello-s3blk /data/hello && sha256sum /data/random && exec sleep 3600"
check "filesystem read on ${workers[1]}" pod_logged reader
check "data attached to ${workers[1]}" attached_to data "${workers[1]}"
check "$mib MiB moved between nodes intact (sha256)" same_sum writer reader

section "raw block PVC moves between nodes"
pvc raw 256Mi Block
pod blockw "${workers[0]}" raw block "head -c $((mib << 20)) /dev/urandom > /tmp/r && dd if=/tmp/r of=/dev/xvda bs=1M conv=fsync && sha256sum /tmp/r && exec sleep 3600"
check "raw block write on ${workers[0]}" pod_logged blockw
check "raw attached to ${workers[0]}" attached_to raw "${workers[0]}"
delete pod blockw
check "raw detached from ${workers[0]}" detached_from raw "${workers[0]}"
pod blockr "${workers[1]}" raw block "dd if=/dev/xvda bs=1M count=$mib | sha256sum && exec sleep 3600"
check "raw block read on ${workers[1]}" pod_logged blockr
check "raw attached to ${workers[1]}" attached_to raw "${workers[1]}"
check "raw block data intact on the other node (sha256)" same_sum blockw blockr
delete pod blockr

section "expansion"
# The reader is gone before the volume is grown and mounted again.
delete pod reader
run kubectl patch pvc data -p '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}'
pv_size_is() { # pvc size
  local i
  for ((i = 0; i < 180; i += 3)); do
    [ "$(kubectl get pv "$(pv_of "$1")" -o jsonpath='{.spec.capacity.storage}')" = "$2" ] && return 0
    sleep 3
  done
  echo "PV of $1 is $(kubectl get pv "$(pv_of "$1")" -o jsonpath='{.spec.capacity.storage}'), not $2" >&2
  return 1
}
pvc_size_is() { # pvc size
  local i
  for ((i = 0; i < 180; i += 3)); do
    [ "$(kubectl get pvc "$1" -o jsonpath='{.status.capacity.storage}')" = "$2" ] && return 0
    sleep 3
  done
  echo "PVC $1 reports $(kubectl get pvc "$1" -o jsonpath='{.status.capacity.storage}'), not $2" >&2
  kubectl get pvc "$1" -o jsonpath='{.status.conditions}' >&2 || true
  return 1
}
df_grew() { # pod KiB
  local size="" i
  for ((i = 0; i < 120; i += 3)); do
    size=$(kubectl exec "$1" -- df -k /data | awk 'NR == 2 {print $2}')
    [ -n "$size" ] && [ "$size" -gt "$2" ] && return 0
    sleep 3
  done
  echo "filesystem in $1 is ${size:-?} KiB, expected more than $2" >&2
  return 1
}
check "PV capacity of data reaches 2Gi" pv_size_is data 2Gi
pod grown "${workers[0]}" data fs "sleep 600"
check "pod on the grown volume runs" pod_running grown
check "PVC data reports 2Gi" pvc_size_is data 2Gi
# ext4 on 2 GiB: well above what 1 GiB could hold.
check "filesystem grew to 2Gi" df_grew grown 1900000
delete pod grown

section "compaction is visible in Kubernetes"
# The controller compacts each PV's volume in one replica (the Lease holder)
# and reports it on the PV: an Event and the s3blk.io annotations.
lease=csi-s3blk-dev-compaction
pv_annotation() { # pv key
  kubectl get pv "$1" -o jsonpath="{.metadata.annotations.${2//./\\.}}"
}
compacted_event() { # pvc [seconds]
  local pv i
  pv=$(pv_of "$1")
  for ((i = 0; i < ${2:-300}; i += 5)); do
    if kubectl get events --field-selector "involvedObject.kind=PersistentVolume,involvedObject.name=$pv,reason=Compacted" \
      -o name | grep -q .; then
      kubectl get events --field-selector "involvedObject.name=$pv" | tail -n 3
      return 0
    fi
    sleep 5
  done
  echo "no Compacted event on $pv ($1); its events and annotations:" >&2
  kubectl get events --field-selector "involvedObject.name=$pv" >&2 || true
  kubectl get pv "$pv" -o jsonpath='{.metadata.annotations}' >&2 || true
  return 1
}
compaction_annotated() { # pvc
  local pv last result
  pv=$(pv_of "$1")
  last=$(pv_annotation "$pv" s3blk.io/last-compaction)
  result=$(pv_annotation "$pv" s3blk.io/last-compaction-result)
  echo "$pv: last compaction ${last:-none}, result ${result:-none}"
  [ -n "$last" ] && [ -n "$result" ] && [[ $result != failed* ]]
}
check "Compacted event on data's PV" compacted_event data
check "data's PV carries the last compaction and its result" compaction_annotated data

# The StorageClass parameters that name secret $1 for every CSI call.
secret_params() {
  local k
  for k in provisioner controller-publish node-stage controller-expand; do
    printf '  csi.storage.k8s.io/%s-secret-name: %s\n  csi.storage.k8s.io/%s-secret-namespace: %s\n' \
      "$k" "$(yq "$1")" "$k" "$ns"
  done
}

section "a second StorageClass in another bucket"
bucket2=volumes-other
run mc mb "local/$bucket2"
if [ "$dry" = 0 ]; then
  secret=$(kubectl get sc s3blk -o jsonpath='{.parameters.csi\.storage\.k8s\.io/provisioner-secret-name}')
else
  secret="<the chart's secret>"
fi
apply <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: s3blk-other}
provisioner: csi.s3blk.dev
allowVolumeExpansion: true
volumeBindingMode: Immediate
parameters:
  bucket: $bucket2
  prefix: other
  csi.storage.k8s.io/fstype: ext4
$(secret_params "$secret")
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: other}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: s3blk-other
  volumeMode: Filesystem
  resources: {requests: {storage: 1Gi}}
YAML
pod otherw "${workers[0]}" other fs "head -c $((mib << 20)) /dev/urandom > /data/random && sync && sha256sum /data/random && exec sleep 3600"
check "write to a volume in $bucket2" pod_logged otherw
in_bucket2() {
  local keys
  keys=$(mc ls --recursive "local/$bucket2") || return 1
  printf '%s\n' "$keys" | grep -q 'volume.json' || { echo "no volume.json in $bucket2: $keys" >&2; return 1; }
}
check "the volume lives in $bucket2" in_bucket2
check "the second StorageClass's volume is compacted (Event)" compacted_event other
check "its PV carries the compaction annotations" compaction_annotated other

section "a StorageClass that flattens its clones"
# The same store as s3blk-other (clones stay in their source's store),
# with flatten: the node serving the clone copies what it reads through
# its source and lets go of it; the source can then be deleted whole.
apply <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: s3blk-flat}
provisioner: csi.s3blk.dev
allowVolumeExpansion: true
volumeBindingMode: Immediate
parameters:
  bucket: $bucket2
  prefix: other
  flatten: "true"
  csi.storage.k8s.io/fstype: ext4
$(secret_params "$secret")
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: flat}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: s3blk-flat
  volumeMode: Filesystem
  resources: {requests: {storage: 1Gi}}
  dataSource: {name: other, kind: PersistentVolumeClaim}
YAML
pod flatr "${workers[1]}" flat fs "sha256sum /data/random && exec sleep 3600"
check "the flattening clone has the data" pod_logged flatr
check "its data is intact (sha256)" same_sum otherw flatr
flattened() {
  local handle i
  handle=$(kubectl get pv "$(pv_of flat)" -o jsonpath='{.spec.csi.volumeHandle}')
  handle=${handle#"s3://$bucket2/"}
  for ((i = 0; i < 180; i += 5)); do
    if mc cat "local/$bucket2/${handle%/}/volume.json" | grep -q '"flattened"'; then
      return 0
    fi
    sleep 5
  done
  echo "${handle%/}/volume.json still names its parent" >&2
  return 1
}
check "the node flattens the clone it serves" flattened

section "an encrypted StorageClass"
# Its secret holds the S3 credentials and the key; the controller (create,
# compaction) and the node (stage) read the key from it. No object in the
# bucket holds what the pod wrote.
run kubectl -n "$ns" create secret generic s3blk-enc --from-literal=accessKeyID=s3blk \
  --from-literal=secretAccessKey=s3blk-secret --from-literal=endpoint="http://minio.$ns:9000" \
  --from-literal=region=us-east-1 --from-literal=encryptionKey="$(printf '5a%.0s' $(seq 32))"
apply <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: s3blk-enc}
provisioner: csi.s3blk.dev
allowVolumeExpansion: true
volumeBindingMode: Immediate
parameters:
  bucket: $bucket2
  prefix: encrypted
  encrypted: "true"
  csi.storage.k8s.io/fstype: ext4
$(secret_params s3blk-enc)
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: sealed}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: s3blk-enc
  volumeMode: Filesystem
  resources: {requests: {storage: 1Gi}}
YAML
pod sealedw "${workers[1]}" sealed fs "yes S3BLK-E2E-PLAINTEXT | head -c $((mib << 20)) > /data/text && sync && sha256sum /data/text && exec sleep 3600"
check "write to an encrypted volume" pod_logged sealedw
no_plaintext() {
  local hits
  hits=$(kubectl -n "$ns" exec deploy/minio -- sh -c "mc alias set local http://localhost:9000 s3blk s3blk-secret >/dev/null \
    && mc mirror --quiet local/$bucket2/encrypted /tmp/sealed >/dev/null && grep -rl S3BLK-E2E-PLAINTEXT /tmp/sealed; rm -rf /tmp/sealed" || true)
  [ -z "$hits" ] || { echo "plaintext in: $hits" >&2; return 1; }
  mc ls --recursive "local/$bucket2/encrypted" | grep -q volume.json
}
check "no object of the encrypted volume holds its plaintext" no_plaintext
check "the encrypted volume is compacted with the secret's key (Event)" compacted_event sealed

section "node plugin restart under a mounted volume"
# The node plugin is restarted (its pod deleted; the DaemonSet makes a new
# one) while otherw keeps its filesystem mounted: the volume is served again
# and the pod reads and writes on as before.
node_plugin_pod() { # node
  kubectl -n "$ns" get pods -l app.kubernetes.io/component=node --field-selector "spec.nodeName=$1" \
    -o jsonpath='{.items[0].metadata.name}'
}
node_plugin_ready() { # node old-pod-name
  local p i
  for ((i = 0; i < 180; i += 3)); do
    p=$(node_plugin_pod "$1" 2>/dev/null || true)
    if [ -n "$p" ] && [ "$p" != "$2" ] \
      && kubectl -n "$ns" get pod "$p" -o jsonpath='{.status.containerStatuses[*].ready}' | grep -q true \
      && ! kubectl -n "$ns" get pod "$p" -o jsonpath='{.status.containerStatuses[*].ready}' | grep -q false; then
      echo "node plugin on $1: $p"
      return 0
    fi
    sleep 3
  done
  echo "no new ready node plugin on $1 (old: $2)" >&2
  return 1
}
io_goes_on() { # pod
  local sum
  sum=$(kubectl exec "$1" -- sh -c 'echo after-restart > /data/after && sync && cat /data/after && sha256sum /data/random') || return 1
  echo "$sum"
  printf '%s\n' "$sum" | grep -qx after-restart && [ "$(printf '%s\n' "$sum" | tail -n 1 | cut -d' ' -f1)" = "${sums[$1]}" ]
}
if [ "$dry" = 0 ]; then old_node_pod=$(node_plugin_pod "${workers[0]}"); else old_node_pod="<node plugin pod>"; fi
run kubectl -n "$ns" delete pod "$old_node_pod" --wait --timeout=300s
check "a new node plugin on ${workers[0]} is ready" node_plugin_ready "${workers[0]}" "$old_node_pod"
check "the mounted volume reads its data and takes writes after the restart" io_goes_on otherw

section "compaction leader failover"
lease_holder() { kubectl -n "$ns" get lease "$lease" -o jsonpath='{.spec.holderIdentity}'; }
new_leader_compacts() { # old-holder pvc since
  local holder pv last i
  pv=$(pv_of "$2")
  for ((i = 0; i < 300; i += 5)); do
    holder=$(lease_holder || true)
    last=$(pv_annotation "$pv" s3blk.io/last-compaction)
    if [ -n "$holder" ] && [ "$holder" != "$1" ] && [[ $last > $3 ]]; then
      echo "Lease $lease now held by $holder; $pv last compacted $last"
      return 0
    fi
    sleep 5
  done
  echo "after deleting the leader: holder ${holder:-none} (was $1), $pv last compacted ${last:-never} (before: $3)" >&2
  return 1
}
if [ "$dry" = 0 ]; then
  leader=$(lease_holder)
  before=$(date -u +%Y-%m-%dT%H:%M:%SZ)
else
  leader="<pod>_<id>" before="<now>"
fi
# The holder identity is the pod name, an underscore and a random part.
run kubectl -n "$ns" delete pod "${leader%_*}" --wait --timeout=180s
check "another replica takes the Lease and compacts" new_leader_compacts "$leader" data "$before"

section "snapshot, restore, clone"
apply <<YAML
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: data-snap}
spec: {volumeSnapshotClassName: s3blk, source: {persistentVolumeClaimName: data}}
YAML
run kubectl wait --for=jsonpath='{.status.readyToUse}'=true volumesnapshot/data-snap --timeout=120s
pvc restored 2Gi Filesystem "dataSource: {name: data-snap, kind: VolumeSnapshot, apiGroup: snapshot.storage.k8s.io}"
pod rreader "${workers[1]}" restored fs "grep -qx hello-s3blk /data/hello && sha256sum /data/random && exec sleep 3600"
check "snapshot restores the data" pod_logged rreader
check "restored data intact (sha256)" same_sum writer rreader
pvc cloned 2Gi Filesystem "dataSource: {name: data, kind: PersistentVolumeClaim}"
pod creader "${workers[0]}" cloned fs "grep -qx hello-s3blk /data/hello && sha256sum /data/random && exec sleep 3600"
check "clone has the data" pod_logged creader
check "cloned data intact (sha256)" same_sum writer creader

section "delete everything down to an empty bucket"
# Every object in the bucket, one key a line; fails when listing does.
bucket_keys() {
  local out
  out=$(mc ls --recursive --json "local/$bucket") || { echo "mc ls failed: $out" >&2; return 1; }
  [ -z "$out" ] && return 0
  if printf '%s\n' "$out" | grep -v '"status":"success"' | grep -q .; then
    echo "mc ls reported errors: $out" >&2
    return 1
  fi
  printf '%s\n' "$out" | sed -n 's/.*"key":"\([^"]*\)".*/\1/p'
}
# Keys of volumes: everything but the store's own records at its root (the
# store marker, and the node records each node plugin writes at start-up).
volume_keys() {
  local keys
  keys=$(bucket_keys) || return 1
  printf '%s\n' "$keys" | grep -vx -e "$store_marker" -e '' | grep -v "^$store_prefix/\.s3blk-nodes/" || true
}
volume_prefix() { # pvc: the volume's prefix in the bucket
  local handle
  handle=$(kubectl get pv "$(pv_of "$1")" -o jsonpath='{.spec.csi.volumeHandle}')
  handle=${handle#"s3://$bucket/"}
  printf '%s/' "${handle%/}"
}
has_objects() { # positive control: the listing sees each volume
  local keys p
  keys=$(volume_keys) || return 1
  echo "$(printf '%s\n' "$keys" | grep -c .) objects in the bucket"
  for p in "$@"; do
    printf '%s\n' "$keys" | grep -qx "${p}volume.json" || { echo "no ${p}volume.json in the bucket" >&2; return 1; }
  done
}
tombstoned() { # prefix
  local keys
  keys=$(volume_keys) || return 1
  printf '%s\n' "$keys" | grep -qx "${1}deleted.json" || { echo "no ${1}deleted.json in the bucket" >&2; return 1; }
}
bucket_empty() {
  local left="" i
  for ((i = 0; i < 420; i += 10)); do
    left=$(volume_keys) || return 1
    [ -z "$left" ] && return 0
    sleep 10
  done
  echo "objects left in the bucket:" >&2
  printf '%s\n' "$left" >&2
  return 1
}
pv_gone() { # pv
  run kubectl wait --for=delete "pv/$1" --timeout=180s
}

if [ "$dry" = 0 ]; then
  data_prefix=$(volume_prefix data)
  data_pv=$(pv_of data)
  dependants_pv=("$(pv_of raw)" "$(pv_of restored)" "$(pv_of cloned)")
  all_prefixes=("$data_prefix" "$(volume_prefix raw)" "$(volume_prefix restored)" "$(volume_prefix cloned)")
else
  data_prefix="$store_prefix/<data's volume>/" data_pv="<data's PV>"
  dependants_pv=("<raw's PV>" "<restored's PV>" "<cloned's PV>")
  all_prefixes=("$data_prefix")
fi
check "the bucket lists every volume before deletion" has_objects "${all_prefixes[@]}"
delete pod rreader creader
delete volumesnapshot data-snap
# The parent first: restored and cloned still read through it, so it is
# only tombstoned.
delete pvc data
pv_gone "$data_pv"
check "deleted parent volume is tombstoned" tombstoned "$data_prefix"
delete pvc raw restored cloned
for pv in "${dependants_pv[@]}"; do pv_gone "$pv"; done
check "bucket holds nothing but the store marker" bucket_empty
if [ "$dry" = 0 ]; then other_pv=$(pv_of other); else other_pv="<other's PV>"; fi
if [ "$dry" = 0 ]; then sealed_pv=$(pv_of sealed); else sealed_pv="<sealed's PV>"; fi
if [ "$dry" = 0 ]; then
  flat_pv=$(pv_of flat)
  other_prefix=$(kubectl get pv "$other_pv" -o jsonpath='{.spec.csi.volumeHandle}')
  other_prefix=${other_prefix#"s3://$bucket2/"}
else
  flat_pv="<flat's PV>" other_prefix="other/<other's volume>"
fi
delete pod otherw sealedw flatr
# The flattened clone's source goes whole while the clone lives on.
delete pvc other sealed
pv_gone "$other_pv"
pv_gone "$sealed_pv"
source_gone() {
  local left="" i
  for ((i = 0; i < 180; i += 10)); do
    left=$(mc ls --recursive "local/$bucket2/${other_prefix%/}/" || true)
    [ -z "$left" ] && return 0
    sleep 10
  done
  echo "left of the flattened clone's source: $left" >&2
  return 1
}
check "the flattened clone's source is deleted whole" source_gone
pod flatr2 "${workers[0]}" flat fs "sha256sum /data/random && exec sleep 3600"
check "the flattened clone reads its data without its source" pod_logged flatr2
check "... intact (sha256)" same_sum otherw flatr2
delete pod flatr2
delete pvc flat
pv_gone "$flat_pv"
bucket2_empty() {
  local left="" i
  for ((i = 0; i < 180; i += 10)); do
    left=$(mc ls --recursive "local/$bucket2" | grep -v -e '\.s3blk-store\.json$' || true)
    [ -z "$left" ] && return 0
    sleep 10
  done
  echo "left in $bucket2: $left" >&2
  return 1
}
check "$bucket2 holds nothing but its store marker" bucket2_empty

finished=1
summary
