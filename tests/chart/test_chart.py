"""The Helm chart, deploy/ manifests, Dockerfile and scripts, checked offline.

Rendering and linting use helm-python-sdk (Helm v4 embedded); every object
is validated strictly (no unknown fields) against the Kubernetes 1.30
schemas with kubernetes-validate.
"""
import os
import pathlib
import re
import shutil
import subprocess

import helm_python
import kubernetes_validate
import pytest
import yaml

from render import CHART, OUT, ROOT, render

KUBE_VERSION = "1.30.0"
IN_CI = os.environ.get("CI") in ("true", "1")

# CRD kinds kubernetes-validate has no schema for: checked by hand.
CRD_REQUIRED = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): {"apiVersion", "kind", "metadata", "driver", "deletionPolicy"},
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {"apiVersion", "kind", "metadata", "spec"},
}


SNAPSHOT_API = "snapshot.storage.k8s.io/v1/VolumeSnapshotClass"


def docs_of(values=None, api_versions=None):
    """Render offline. `api_versions`: APIs the pretend cluster serves besides
    the built-in ones (helm's --api-versions)."""
    chart = helm_python.Chart.load(str(CHART))
    if api_versions:
        # Chart.render has no api_versions argument; its native call does.
        import json
        from helm_python import _native
        opts = {"name": "s3blk", "namespace": "kube-system", "is_install": True, "api_versions": api_versions}
        out = json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(values or {}), json.dumps(opts)))
    else:
        out = chart.render(values or {}, name="s3blk", namespace="kube-system", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs, out


def validate_all(docs):
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_REQUIRED:
            missing = CRD_REQUIRED[key] - set(doc)
            assert not missing, f"{key}: missing {missing}"
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def kinds(docs):
    return sorted(d["kind"] for d in docs)


def find(docs, kind, name_part=""):
    return [d for d in docs if d["kind"] == kind and name_part in d["metadata"]["name"]]


def test_default_render_has_every_component_and_validates():
    docs, out = docs_of(api_versions=[SNAPSHOT_API])
    validate_all(docs)
    for kind in ["CSIDriver", "Deployment", "DaemonSet", "StorageClass", "VolumeSnapshotClass", "ClusterRole",
                 "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount", "PodDisruptionBudget", "Service"]:
        assert find(docs, kind), f"no {kind} rendered"
    driver = find(docs, "CSIDriver")[0]["spec"]
    assert driver["attachRequired"] is True and driver["podInfoOnMount"] is False
    assert driver["storageCapacity"] is False
    ctrl_args = find(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--capacity-tracking" not in ctrl_args, "GET_CAPACITY is advertised only with capacity tracking"
    ctrl = find(docs, "Deployment")[0]["spec"]
    assert ctrl["replicas"] == 2
    names = [c["name"] for c in ctrl["template"]["spec"]["containers"]]
    for sidecar in ["csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter", "liveness-probe"]:
        assert sidecar in names
    assert ctrl["template"]["spec"]["priorityClassName"] == "system-cluster-critical"
    # Longer than the 60 s a stopping controller waits for abandoned calls.
    assert ctrl["template"]["spec"]["terminationGracePeriodSeconds"] == 90
    ds = find(docs, "DaemonSet")[0]["spec"]["template"]["spec"]
    assert ds["priorityClassName"] == "system-node-critical"
    node = [c for c in ds["containers"] if c["name"] == "s3blk"][0]
    assert node["securityContext"]["privileged"] is True
    # Nodes register under the store the controller looks them up in.
    ctrl_main = [c for c in ctrl["template"]["spec"]["containers"] if c["name"] == "s3blk"][0]
    store_of = lambda c: [a for a in c["args"] if a.startswith("--store=")]
    assert store_of(node) == store_of(ctrl_main) == ["--store=s3://s3blk/kubernetes"]
    kubelet = [m for m in node["volumeMounts"] if m["name"] == "kubelet-dir"][0]
    assert kubelet["mountPropagation"] == "Bidirectional"
    assert ds["initContainers"][0]["command"] == ["modprobe", "nbd", "nbds_max=64"]
    modules = [v for v in ds["volumes"] if v["name"] == "modules"][0]
    assert modules["hostPath"]["path"] == "/lib/modules"
    # Kernels before 6.4 offer the nbd netlink interface (reconnect after a
    # plugin restart) only in the host's network namespace; in-cluster DNS
    # still resolves with ClusterFirstWithHostNet.
    assert ds["hostNetwork"] is True and ds["dnsPolicy"] == "ClusterFirstWithHostNet"
    # Containers of one pod share a network namespace: no port may repeat.
    for workload in find(docs, "Deployment") + find(docs, "DaemonSet"):
        pod = workload["spec"]["template"]["spec"]
        used = []
        for c in pod["containers"]:
            mine = {p["containerPort"] for p in c.get("ports", [])}
            mine |= {int(a.rsplit(":", 1)[1]) for a in c.get("args", [])
                     if re.match(r"--(http-endpoint|metrics-address)=", a)}
            used += sorted(mine)
        assert len(used) == len(set(used)), f"{workload['metadata']['name']}: ports repeat: {used}"
    sc = find(docs, "StorageClass")[0]
    assert sc["allowVolumeExpansion"] is True and sc["provisioner"] == "csi.s3blk.dev"
    assert sc["parameters"]["csi.storage.k8s.io/fstype"] == "ext4" and "fsType" not in sc["parameters"]
    assert "compression" not in sc["parameters"], "uncompressed by default"
    assert "flatten" not in sc["parameters"], "clones read through their source by default"
    assert "kubectl" in out["s3blk/templates/NOTES.txt"] and "PersistentVolumeClaim" in out["s3blk/templates/NOTES.txt"]


def test_rbac_is_least_privilege():
    docs, _ = docs_of()
    rules = find(docs, "ClusterRole", "controller")[0]["rules"]
    for r in rules:
        assert "*" not in r["verbs"] and "*" not in r["resources"], r
        assert "secrets" not in r["resources"], "secrets are readable in the release namespace only"
        assert "pods" not in r["resources"], "nothing reads pods"
    role = find(docs, "Role")[0]
    assert role["metadata"]["namespace"] == "kube-system"
    by_resource = {res: r["verbs"] for r in role["rules"] for res in r["resources"]}
    # The compaction loop: PersistentVolumes watched and annotated, Events.
    cluster = {(g, res): r["verbs"] for r in rules for g in r["apiGroups"] for res in r["resources"]}
    assert {"get", "list", "watch", "patch"} <= set(cluster[("", "persistentvolumes")])
    assert {"create", "patch"} <= set(cluster[("events.k8s.io", "events")])
    assert by_resource["secrets"] == ["get"], "secrets are read, never listed"
    assert {"get", "create", "update"} <= set(by_resource["leases"])
    # The node plugin reads its node's VolumeAttachments (and their PVs)
    # before serving a staged volume again after a restart; nothing more.
    node_sa = find(docs, "ServiceAccount", "node")[0]
    assert node_sa["automountServiceAccountToken"] is True
    node_rules = find(docs, "ClusterRole", "node")[0]["rules"]
    assert sorted((g, res, tuple(r["verbs"])) for r in node_rules for g in r["apiGroups"] for res in r["resources"]) == [
        ("", "persistentvolumes", ("get",)), ("storage.k8s.io", "volumeattachments", ("get", "list"))]
    binding = find(docs, "ClusterRoleBinding", "node")[0]
    assert binding["roleRef"]["name"] == find(docs, "ClusterRole", "node")[0]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": node_sa["metadata"]["name"],
                                    "namespace": "kube-system"}]


def node_container(docs):
    return [c for c in find(docs, "DaemonSet")[0]["spec"]["template"]["spec"]["containers"] if c["name"] == "s3blk"][0]


def test_operations_defaults():
    docs, _ = docs_of()
    ctrl = find(docs, "Deployment")[0]["spec"]["template"]["spec"]
    driver = ctrl["containers"][0]
    assert driver["name"] == "s3blk"
    assert driver["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9898}
    liveness = [c for c in ctrl["containers"] if c["name"] == "liveness-probe"][0]
    assert "--http-endpoint=:9898" in liveness["args"]
    anti = ctrl["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert anti["podAffinityTerm"]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "controller"
    assert {"key": "CriticalAddonsOnly", "operator": "Exists"} in ctrl["tolerations"]
    ds = find(docs, "DaemonSet")[0]["spec"]
    assert ds["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    pod = ds["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 300
    node = node_container(docs)
    assert node["livenessProbe"]["httpGet"]["port"] == 9898
    hook = node["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:2] == ["/usr/local/bin/s3blk", "csi-flush"]
    assert "--state-dir=/var/lib/s3blk" in hook
    # The hook leaves half the grace period to the flush on SIGTERM.
    timeout = int(re.search(r"--timeout=(\d+)s", " ".join(hook)).group(1))
    assert 0 < timeout <= pod["terminationGracePeriodSeconds"] // 2
    # Both the controller's and every node's metrics have a Service.
    services = {s["metadata"]["name"]: s for s in find(docs, "Service")}
    assert services["s3blk-metrics"]["spec"]["selector"]["app.kubernetes.io/component"] == "controller"
    assert services["s3blk-node-metrics"]["spec"]["selector"]["app.kubernetes.io/component"] == "node"
    assert any(p.get("name") == "metrics" for p in node["ports"])


def test_volume_snapshot_class_only_where_the_snapshot_api_exists():
    without, _ = docs_of()
    assert not find(without, "VolumeSnapshotClass"), "helm install fails on clusters without the snapshot CRDs"
    with_api, _ = docs_of(api_versions=[SNAPSHOT_API])
    assert find(with_api, "VolumeSnapshotClass")[0]["driver"] == "csi.s3blk.dev"
    forced, _ = docs_of({"volumeSnapshotClass": {"force": True}})
    assert find(forced, "VolumeSnapshotClass")
    off, _ = docs_of({"volumeSnapshotClass": {"create": False}}, api_versions=[SNAPSHOT_API])
    assert not find(off, "VolumeSnapshotClass")


MATRIX = [
    ({"s3": {"existingSecret": "my-s3"}}, lambda d: not find(d, "Secret")
     and "my-s3" in str(find(d, "StorageClass")[0]["parameters"])),
    ({"s3": {"accessKeyID": "AK", "secretAccessKey": "SK", "endpoint": "http://minio:9000", "checksums": "when-required"}},
     lambda d: find(d, "Secret")[0]["stringData"]["endpoint"] == "http://minio:9000"),
    ({"storageClass": {"default": True, "fsType": "xfs", "reclaimPolicy": "Retain", "parameters": {"mkfsOptions": "-m 0"}}},
     lambda d: find(d, "StorageClass")[0]["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"
     and find(d, "StorageClass")[0]["parameters"]["mkfsOptions"] == "-m 0"
     and find(d, "StorageClass")[0]["parameters"]["csi.storage.k8s.io/fstype"] == "xfs"),
    ({"storageClass": {"compression": "zstd"}},
     lambda d: find(d, "StorageClass")[0]["parameters"]["compression"] == "zstd"),
    ({"storageClass": {"flatten": True}},
     lambda d: find(d, "StorageClass")[0]["parameters"]["flatten"] == "true"),
    # Encryption: the chart's Secret holds the key (with or without S3
    # credentials: IRSA), every secret reference names it, the driver's
    # environment takes credentials only where there are any.
    ({"encryption": {"enabled": True, "key": "ab" * 32}},
     lambda d: find(d, "StorageClass")[0]["parameters"]["encrypted"] == "true"
     and find(d, "Secret")[0]["stringData"] == {"encryptionKey": "ab" * 32}
     and find(d, "StorageClass")[0]["parameters"]["csi.storage.k8s.io/node-stage-secret-name"]
     == find(d, "Secret")[0]["metadata"]["name"]
     and find(d, "StorageClass")[0]["parameters"]["csi.storage.k8s.io/controller-expand-secret-name"]
     == find(d, "Secret")[0]["metadata"]["name"]
     and "AWS_ACCESS_KEY_ID" not in str(find(d, "Deployment")[0])),
    ({"encryption": {"enabled": True, "key": "q" * 43 + "="}, "s3": {"accessKeyID": "AK", "secretAccessKey": "SK"}},
     lambda d: set(find(d, "Secret")[0]["stringData"]) == {"accessKeyID", "secretAccessKey", "region", "encryptionKey"}
     and "AWS_ACCESS_KEY_ID" in str(find(d, "Deployment")[0])),
    ({"encryption": {"enabled": True}, "s3": {"existingSecret": "mine"}},
     lambda d: not find(d, "Secret") and find(d, "StorageClass")[0]["parameters"]["encrypted"] == "true"
     and find(d, "StorageClass")[0]["parameters"]["csi.storage.k8s.io/provisioner-secret-name"] == "mine"),
    # A key without encryption on: the class says so (the driver refuses a
    # key the class says nothing about).
    ({"encryption": {"key": "ab" * 32}},
     lambda d: find(d, "StorageClass")[0]["parameters"]["encrypted"] == "false"),
    ({}, lambda d: "encrypted" not in find(d, "StorageClass")[0]["parameters"]),
    ({"node": {"updateStrategy": {"type": "OnDelete"}, "terminationGracePeriodSeconds": 900}},
     lambda d: find(d, "DaemonSet")[0]["spec"]["updateStrategy"] == {"type": "OnDelete"}
     and find(d, "DaemonSet")[0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 900
     and "--timeout=450s" in node_container(d)["lifecycle"]["preStop"]["exec"]["command"]),
    ({"controller": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "role", "operator": "In", "values": ["infra"]}]}]}}},
        "tolerations": [], "livenessPort": 19898}},
     lambda d: "podAntiAffinity" not in find(d, "Deployment")[0]["spec"]["template"]["spec"]["affinity"]
     and "tolerations" not in find(d, "Deployment")[0]["spec"]["template"]["spec"]
     and find(d, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] == 19898),
    ({"storageClass": {"create": False}, "volumeSnapshotClass": {"create": False}},
     lambda d: not find(d, "StorageClass") and not find(d, "VolumeSnapshotClass")),
    ({"controller": {"replicas": 1}}, lambda d: not find(d, "PodDisruptionBudget")),
    ({"metrics": {"enabled": False}}, lambda d: not find(d, "Service")),
    # GET_CAPACITY only with the provisioner's capacity tracking, and both together.
    ({"controller": {"capacityTracking": True}},
     lambda d: "--capacity-tracking" in find(d, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
     and "--enable-capacity" in [c for c in find(d, "Deployment")[0]["spec"]["template"]["spec"]["containers"]
                                 if c["name"] == "csi-provisioner"][0]["args"]
     and find(d, "CSIDriver")[0]["spec"]["storageCapacity"] is True
     and any("csistoragecapacities" in r["resources"] for r in find(d, "Role")[0]["rules"])),
    ({"volumeSnapshotClass": {"force": True, "deletionPolicy": "Retain"}},
     lambda d: find(d, "VolumeSnapshotClass")[0]["deletionPolicy"] == "Retain"),
    ({"metrics": {"serviceMonitor": {"enabled": True}}}, lambda d: find(d, "ServiceMonitor")),
    ({"node": {"kubeletDir": "/var/lib/k0s/kubelet", "nbdsMax": 128}, "driverName": "blk.example.com"},
     lambda d: "/var/lib/k0s/kubelet/plugins/blk.example.com" in str(find(d, "DaemonSet")[0])
     and find(d, "CSIDriver")[0]["metadata"]["name"] == "blk.example.com"),
    # The node's memory budget: from the container's limit unless set.
    ({}, lambda d: not any(a.startswith(("--memory-budget", "--dirty-limit", "--cache-size"))
                           for a in node_container(d)["args"])
     and {"name": "S3BLK_MEMORY_LIMIT", "valueFrom": {"resourceFieldRef": {"containerName": "s3blk",
                                                                          "resource": "limits.memory"}}}
     in node_container(d)["env"]),
    ({"node": {"memoryBudget": "1536Mi"}}, lambda d: "--memory-budget=1536Mi" in node_container(d)["args"]),
    # The write-back log's size before a flush is forced, per staged volume.
    ({}, lambda d: "--write-log-limit=1GiB" in node_container(d)["args"]),
    ({"node": {"writeLogLimit": "4GiB"}}, lambda d: "--write-log-limit=4GiB" in node_container(d)["args"]),
    # S3 requests in flight across the node's volumes.
    ({}, lambda d: "--requests-in-flight=64" in node_container(d)["args"]),
    ({"node": {"requestsInFlight": 256}}, lambda d: "--requests-in-flight=256" in node_container(d)["args"]),
    ({"node": {"hostNetwork": False}},
     lambda d: "hostNetwork" not in find(d, "DaemonSet")[0]["spec"]["template"]["spec"]
     and "dnsPolicy" not in find(d, "DaemonSet")[0]["spec"]["template"]["spec"]),
    ({"node": {"registrarPort": 19809, "livenessPort": 19898}},
     lambda d: {"--http-endpoint=:19809", "--http-endpoint=:19898"}
     <= {a for c in find(d, "DaemonSet")[0]["spec"]["template"]["spec"]["containers"] for a in c.get("args", [])}
     and "19809" in str(find(d, "DaemonSet")[0]["spec"]["template"]["spec"]["containers"][1]["livenessProbe"])),
    ({"controller": {"compaction": {"interval": 0, "safetyAge": "10m"}}},
     lambda d: {"--compact-interval=0", "--compact-safety-age=10m"}
     <= set(find(d, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"])),
    ({"image": {"repository": "registry.local/s3blk", "tag": "dev", "pullPolicy": "Always"},
      "imagePullSecrets": [{"name": "regcred"}]},
     lambda d: "registry.local/s3blk:dev" in str(find(d, "Deployment")[0])),
]


@pytest.mark.parametrize("values,expect", MATRIX, ids=[str(i) for i in range(len(MATRIX))])
def test_value_matrix_renders_and_validates(values, expect):
    docs, _ = docs_of(values)
    validate_all(docs)
    assert expect(docs), f"unexpected render for {values}"


def test_lint_is_clean():
    report = helm_python.lint(str(CHART), strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", [
    {"controller": {"replicas": 0}},
    {"node": {"nbdsMax": 0}},
    {"storageClass": {"fsType": "btrfs"}},
    {"storageClass": {"reclaimPolicy": "Recycle"}},
    {"storageClass": {"compression": "gzip"}},
    {"storageClass": {"flatten": "yes"}},
    {"encryption": {"enabled": "yes"}},
    {"encryption": {"key": "hunter2"}},
    {"encryption": {"enabled": True, "key": "ab" * 31}},
    {"store": {"bucket": "Not A Bucket"}},
    {"s3": {"checksums": "sometimes"}},
    {"s3": {"endpoint": "minio:9000"}},
    {"metrics": {"port": 70000}},
    {"node": {"hostNetwork": "yes"}},
    {"node": {"livenessPort": 0}},
    {"node": {"memoryBudget": "lots"}},
    {"node": {"writeLogLimit": "lots"}},
    {"node": {"requestsInFlight": 0}},
    {"node": {"requestsInFlight": "many"}},
    {"node": {"updateStrategy": {"type": "Recreate"}}},
    {"node": {"terminationGracePeriodSeconds": 5}},
    {"controller": {"livenessPort": 0}},
    {"controller": {"compaction": {"interval": "daily", "safetyAge": "5m"}}},
    {"controller": {"compaction": {"interval": "1h", "safetyAge": -1}}},
    # With compaction on, the controller refuses a safety age under 120 s at start.
    {"controller": {"compaction": {"interval": "1h", "safetyAge": "60s"}}},
    {"controller": {"compaction": {"interval": "15s", "safetyAge": 119}}},
    {"controller": {"compaction": {"interval": 300, "safetyAge": "119"}}},
    {"controller": {"compaction": {"interval": "1h", "safetyAge": "1m"}}},
    {"controller": {"compaction": {"interval": "1h", "safetyAge": "0h"}}},
    {"controller": {"compaction": {"interval": "10m", "safetyAge": 0}}},
    {"typo": True},
    {"driverName": "UPPER_case"},
])
def test_schema_rejects_bad_values(values):
    chart = helm_python.Chart.load(str(CHART))
    with pytest.raises(helm_python.HelmValuesError):
        chart.render(values, name="s3blk", namespace="kube-system")


@pytest.mark.parametrize("values,needle", [
    ({"encryption": {"enabled": True}}, "encryption.enabled needs encryption.key"),
    ({"encryption": {"enabled": True, "key": "ab" * 32}, "s3": {"existingSecret": "mine"}}, "put encryptionKey into"),
])
def test_encryption_without_a_key_fails_to_render(values, needle):
    chart = helm_python.Chart.load(str(CHART))
    with pytest.raises(Exception, match=needle):
        chart.render(values, name="s3blk", namespace="kube-system")


@pytest.mark.parametrize("interval,safety_age", [
    ("1h", "120s"), ("15s", 120), ("1h", "120"), ("1h", "2m"), ("1h", "1h"), ("1h", "5m"), ("1h", "0300s"),
    # Compaction off: the controller does not check the age.
    (0, "30s"), ("0", 0), ("0s", "1m"), ("0h", 5),
])
def test_schema_accepts_safety_ages_the_controller_starts_with(interval, safety_age):
    docs, _ = docs_of({"controller": {"compaction": {"interval": interval, "safetyAge": safety_age}}})
    args = find(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {f"--compact-interval={interval}", f"--compact-safety-age={safety_age}"} <= set(args)


def test_deploy_matches_the_rendered_chart():
    assert OUT.read_text() == render(), "deploy/s3blk.yaml is stale: run tests/chart/render.py"
    kust = yaml.safe_load((ROOT / "deploy" / "kustomization.yaml").read_text())
    assert kust["resources"] == ["s3blk.yaml"]


# Which Debian package provides each program the node plugin runs.
PACKAGE_OF = {
    "nbd-client": "nbd-client", "blkid": "util-linux", "blockdev": "util-linux", "mkfs.ext4": "e2fsprogs",
    "resize2fs": "e2fsprogs", "fsck.ext4": "e2fsprogs", "mkfs.xfs": "xfsprogs", "xfs_growfs": "xfsprogs", "mount": "mount",
    "umount": "mount", "modprobe": "kmod",
}


def test_dockerfile_runtime_stage_provides_every_program_the_code_runs():
    src = (ROOT / "src" / "csi" / "mount.rs").read_text()
    programs = re.search(r"pub const PROGRAMS: &\[&str\] =\s*&\[(.*?)\];", src, re.S).group(1)
    programs = re.findall(r'"([^"]+)"', programs) + ["modprobe"]  # modprobe: the DaemonSet's init container
    unknown = [p for p in programs if p not in PACKAGE_OF]
    assert not unknown, f"map these programs to Debian packages: {unknown}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    runtime = dockerfile.split("\nFROM ")[-1]
    install = re.search(r"apt-get install[^\n]*\n(.*?)&& rm", runtime, re.S).group(1)
    packages = set(install.replace("\\", " ").split())
    for prog in programs:
        assert PACKAGE_OF[prog] in packages, f"{prog} needs package {PACKAGE_OF[prog]} in the runtime stage"
    assert "ca-certificates" in packages
    assert "USER 65532" in runtime


def shell_scripts():
    found = [ROOT / ".ci" / "run"]
    for d in ["tests", "bench"]:
        found.extend(sorted((ROOT / d).rglob("*.sh")))
    return found


def test_scripts_pass_shellcheck():
    if not shutil.which("shellcheck"):
        assert not IN_CI, "shellcheck is required (tests/run.sh installs it)"
        pytest.skip("shellcheck not installed")
    scripts = shell_scripts()
    assert len(scripts) >= 6
    r = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def kind_dry_run(**env):
    r = subprocess.run([str(ROOT / "tests" / "e2e" / "kind.sh"), "--dry-run"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    return r.stdout


def heredocs(out):
    """The inline manifests a dry run prints: (terminator, text) for every
    `<<'END'` block, in order."""
    found, lines = [], iter(out.splitlines())
    for line in lines:
        m = re.search(r"<<'(\w+)'", line)
        if not line.startswith("+ ") or not m:
            continue
        end, body = m.group(1), []
        for inner in lines:
            if inner == end:
                break
            body.append(inner)
        else:
            raise AssertionError(f"heredoc {end!r} not closed after {line!r}")
        found.append((end, "\n".join(body)))
    return found


def test_kind_e2e_dry_run_prints_every_step():
    out = kind_dry_run()
    for step in ["kind create cluster", "docker build", "kind load docker-image", "kind load image-archive",
                 "helm install s3blk charts/s3blk", "rollout status deploy/snapshot-controller",
                 "kind: VolumeSnapshot", "dataSource: {name: data-snap", "volumeMode: Block",
                 "kubectl patch pvc data", "controller.compaction.interval=15s", "deleted parent volume is tombstoned",
                 "bucket holds nothing but the store marker", "nothing was executed",
                 "Compacted event on data's PV", "storageClassName: s3blk-other", "holds nothing but its store marker",
                 "a new node plugin on", "another replica takes the Lease and compacts",
                 "encrypted: \"true\"", "no object of the encrypted volume holds its plaintext",
                 "flatten: \"true\"", "the node flattens the clone it serves",
                 "the flattened clone's source is deleted whole"]:
        assert step in out, f"dry run does not show {step!r}"
    # The image is built before the cluster exists.
    assert out.index("docker build") < out.index("kind create cluster")
    # Deletions and waits are bounded (kubectl's default is a week).
    for line in out.splitlines():
        if line.startswith(("+ kubectl delete", "+ kubectl wait", "+ kubectl -n kube-system rollout")):
            assert "--timeout" in line, line
    # The parent goes first, its dependants after it is seen tombstoned.
    assert out.index("+ kubectl delete pvc data ") < out.index("tombstoned") < out.index("delete pvc raw restored cloned")


def test_kind_e2e_manifests_parse_and_validate():
    docs = []
    for end, text in heredocs(kind_dry_run()):
        try:
            parsed = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as e:
            raise AssertionError(f"invalid YAML in the {end} manifest:\n{text}\n{e}") from e
        assert parsed, f"empty {end} manifest"
        docs.extend(parsed)
    kinds_seen = sorted(d["kind"] for d in docs)
    assert kinds_seen.count("Pod") == 11 and kinds_seen.count("PersistentVolumeClaim") == 7, kinds_seen
    for kind in ["Cluster", "Deployment", "Service", "VolumeSnapshot", "StorageClass"]:
        assert kind in kinds_seen, f"no {kind} among the e2e manifests"
    validated = 0
    for doc in docs:
        if doc["apiVersion"].startswith(("kind.x-k8s.io/", "snapshot.storage.k8s.io/")):
            # No schema in kubernetes-validate: the fields the run relies on.
            assert doc["kind"] in ("Cluster", "VolumeSnapshot"), doc
            if doc["kind"] == "VolumeSnapshot":
                assert doc["spec"]["source"]["persistentVolumeClaimName"] == "data"
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        validated += 1
    assert validated == len(docs) - 2 == 23
    # Every data pod's command is one shell string that reached YAML intact.
    commands = [d["spec"]["containers"][0]["command"] for d in docs if d["kind"] == "Pod"]
    assert all(c[:2] == ["sh", "-c"] and len(c) == 3 for c in commands), commands
    assert any("sha256sum" in c[2] and "/dev/xvda" in c[2] for c in commands)


def test_kind_e2e_pins_versions_the_chart_supports():
    out = kind_dry_run()
    cluster = next(yaml.safe_load(t) for end, t in heredocs(out) if end == "KIND")
    images = {n["image"] for n in cluster["nodes"]}
    assert len(images) == 1, images
    m = re.fullmatch(r"kindest/node:v(\d+)\.(\d+)\.(\d+)(@sha256:[0-9a-f]{64})?", images.pop())
    assert m, "kindest/node must be pinned to a release"
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    low = re.match(r">=\s*(\d+)\.(\d+)", chart["kubeVersion"])
    assert (int(m.group(1)), int(m.group(2))) >= (int(low.group(1)), int(low.group(2))) >= (1, 30)
    # kind mounts /lib/modules itself: no second mount of it.
    for node in cluster["nodes"]:
        assert all(x["containerPath"] != "/lib/modules" for x in node.get("extraMounts", []))
    minio = re.search(r"image: (quay\.io/minio/minio:\S+)", out).group(1)
    assert re.fullmatch(r"quay\.io/minio/minio:RELEASE\.\d{4}-\d\d-\d\dT[\d-]+Z", minio), minio
    assert minio >= "quay.io/minio/minio:RELEASE.2024-08-29", "older MinIO ignores If-None-Match on PutObject"


@pytest.mark.parametrize("image,repo,tag", [
    ("s3blk:e2e", "s3blk", "e2e"),
    ("localhost:5000/s3blk:dev", "localhost:5000/s3blk", "dev"),
    ("localhost:5000/s3blk", "localhost:5000/s3blk", "latest"),
    ("registry.example:443/team/s3blk:1.2", "registry.example:443/team/s3blk", "1.2"),
])
def test_kind_e2e_image_reference_with_registry_port(image, repo, tag):
    out = kind_dry_run(IMAGE=image)
    assert f"--set image.repository={repo} --set image.tag={tag} " in out
    assert f"docker build -t {image} ." in out
