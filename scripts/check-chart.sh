#!/usr/bin/env bash
# CI check of the Helm chart: lint, render under several value sets (both modes: devicePlugin
# and dra), reject bad values through
# values.schema.json, scan the RBAC for wildcards/cluster-admin, check the Grafana dashboard
# against docs/metrics.md, and fail on manifests/ drift.
#
#   scripts/check-chart.sh
#
# Prints "N passed, 0 failed" at the end; exits non-zero on the first failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="$ROOT/charts/vramslice"
HELM="${HELM:-$("$ROOT/scripts/install-helm.sh")}"
export HELM
KV=(--kube-version v1.37.2)
passed=0
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT

ok() { passed=$((passed + 1)); echo "ok   $*"; }
fail() { echo "FAIL $*" >&2; echo "$passed passed, 1 failed"; exit 1; }

# Value sets every release must render and lint with.
variants=(
  "defaults|"
  "ha|--set scheduler.replicas=3"
  "spread-512mi|--set extender.policy=spread --set unit=512Mi --set devicePlugin.injection.mode=ld-preload-env"
  "cert-manager|--set webhook.certManager.enabled=true --set metrics.serviceMonitor.enabled=true"
  "cert-manager-issuer|--set webhook.certManager.enabled=true --set webhook.certManager.issuerRef.kind=ClusterIssuer --set webhook.certManager.issuerRef.name=corp-ca"
  "no-webhook|--set webhook.enabled=false --set devicePlugin.deviceListStrategy=cdi"
  "netpol|--set networkPolicy.enabled=true --set networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.team=monitoring"
  "fake-gpus|--set devicePlugin.backend=fake --set devicePlugin.fakeGpuFile=/etc/fake/gpus.yaml --set devicePlugin.extraConfig.publish.heartbeat=10s"
  "dra|--set mode=dra --set metrics.serviceMonitor.enabled=true --set networkPolicy.enabled=true"
  "dra-extender|--set mode=dra --set dra.deployExtender=true --set dra.slicePolicy=false --set unit=512Mi --set dra.publishThreshold=2Gi --set devicePlugin.kubeletRootDir=/var/lib/k0s/kubelet"
)
for v in "${variants[@]}"; do
  name="${v%%|*}"; args="${v#*|}"
  # shellcheck disable=SC2086
  "$HELM" lint --strict "$CHART" $args "${KV[@]}" > "$tmp/lint.log" 2>&1 || { cat "$tmp/lint.log"; fail "helm lint ($name)"; }
  ok "helm lint --strict ($name)"
  # shellcheck disable=SC2086
  "$HELM" template vramslice "$CHART" --namespace vramslice-system $args "${KV[@]}" > "$tmp/$name.yaml" 2> "$tmp/tpl.log" \
    || { cat "$tmp/tpl.log"; fail "helm template ($name)"; }
  ok "helm template ($name): $(grep -c '^kind:' "$tmp/$name.yaml") objects"
done

# Facts the rendering must hold.
expect() { # file, grep pattern, description
  grep -qE -- "$2" "$1" || fail "$3 (pattern '$2' not in $(basename "$1"))"
  ok "$3"
}
reject() {
  if grep -qE -- "$2" "$1"; then fail "$3 (pattern '$2' found in $(basename "$1"))"; fi
  ok "$3"
}
d="$tmp/defaults.yaml"
expect "$d" 'metricsAddr: 0\.0\.0\.0:9400' "listeners on the pod IP bind IPv4 by default"
expect "$d" '^                path: /drain$' "kube-scheduler keeps its lease until the extender has drained (preStop /drain)"
expect "$d" '^      terminationGracePeriodSeconds: 120$' "the scheduler pod has time for the drain"
"$HELM" template vramslice "$CHART" --namespace vramslice-system --set listenHost=:: "${KV[@]}" > "$tmp/ipv6.yaml" \
  || fail "helm template (listenHost=::)"
expect "$tmp/ipv6.yaml" "metricsAddr: '\\[::\\]:9400'" "listenHost=:: binds the node agent's metrics on [::]"
expect "$tmp/ipv6.yaml" "metricsAddr: '\\[::\\]:8889'" "listenHost=:: binds the extender's metrics on [::]"
expect "$tmp/ipv6.yaml" "listenAddr: '\\[::\\]:8443'" "listenHost=:: binds the webhook on [::]"
expect "$tmp/ipv6.yaml" 'listenAddr: 127\.0\.0\.1:8888' "the scheduler API stays on loopback"
expect "$d" 'image: "?registry.k8s.io/kube-scheduler:v1\.37\.2' "scheduler image follows the cluster version"
expect "$d" 'leaderElect: true' "one replica: leader election on (scaling up never overlaps an unelected pod)"
expect "$d" 'vramslice.io/leader-elect: "true"' "the Deployment says whether its pods elect (read back by the next upgrade)"
expect "$d" '^    percentageOfNodesToScore: 100$' "the extender judges every feasible node, not a sample"
expect "$d" 'type: RollingUpdate' "electing pods (first install): RollingUpdate"
expect "$d" '^                seconds: 10$' "the extender serves 10 s after termination starts (preStop sleep)"
expect "$d" 'reinvocationPolicy: IfNeeded' "the webhook is called again after later mutations"
expect "$d" 'secretName: vramslice-webhook-tls$' "self-signed webhook Secret name"
expect "$tmp/cert-manager.yaml" 'secretName: vramslice-webhook-cm-tls$' "cert-manager's webhook Secret has a name of its own"
reject "$tmp/cert-manager.yaml" 'vramslice-webhook-tls$' "cert-manager mode never names the chart's own Secret"
"$HELM" template vramslice "$CHART" "${KV[@]}" --set scheduler.leaderElection.enabled=false > "$tmp/no-le.yaml"
expect "$tmp/no-le.yaml" 'type: Recreate' "leader election off: Recreate strategy"
expect "$tmp/no-le.yaml" 'vramslice.io/leader-elect: "false"' "leader election off: said on the Deployment"
expect "$d" 'failurePolicy: Fail$' "webhook failurePolicy Fail by default"
"$HELM" template vramslice "$CHART" "${KV[@]}" --set webhook.failurePolicy=Ignore > "$tmp/wh-ignore.yaml"
expect "$tmp/wh-ignore.yaml" 'failurePolicy: Ignore$' "webhook.failurePolicy=Ignore passed through"
expect "$d" 'hostPID: true' "device plugin uses hostPID"
expect "$d" 'fieldPath: spec.nodeName' "NODE_NAME from the downward API"
expect "$d" 'mode: ld-so-preload-file' "default injection mode"
expect "$d" "printf '%s\\\\n' /usr/local/vramslice/lib/libvramslice_guard.so" "preload file names the in-container guard path"
expect "$d" 'name: vramslice.io/vram-gib' "extender manages vramslice.io/vram-gib"
# Whoever reaches /bind binds pending pods: the scheduler API stays on loopback beside
# kube-scheduler, and only the probes and metrics are on the pod IP.
expect "$d" '^    listenAddr: 127\.0\.0\.1:8888$' "extender scheduler API on loopback only"
expect "$d" '^    metricsAddr: 0\.0\.0\.0:8889$' "extender probes and metrics on their own port"
expect "$d" 'urlPrefix: http://127\.0\.0\.1:8888$' "kube-scheduler calls the extender on loopback"
reject "$d" 'containerPort: 8888$' "the scheduler API port is not declared on the pod IP"
if "$HELM" template vramslice "$CHART" "${KV[@]}" --set extender.metricsPort=8888 > "$tmp/same-port.yaml" 2> "$tmp/same-port.err"; then
  fail "extender.port = extender.metricsPort was accepted"
fi
expect "$tmp/same-port.err" 'both 8888' "extender.port = extender.metricsPort refused, naming the port"
if "$HELM" template vramslice "$CHART" "${KV[@]}" --set extender.metricsPort=8443 > "$tmp/wh-port.yaml" 2> "$tmp/wh-port.err"; then
  fail "extender.metricsPort = webhook.port was accepted"
fi
expect "$tmp/wh-port.err" 'webhook.port 8443 is taken' "extender.metricsPort = webhook.port refused, naming the port"
reject "$d" 'kind: PodDisruptionBudget' "one replica: no PDB"
# The RBAC scan reads the RBAC objects only: the FlowSchema's rules match every request of the
# scheduler's identity (how they queue, not what they may do), like Kubernetes' own.
rbac_of() { # rendered file -> its Roles, ClusterRoles and bindings
  awk 'BEGIN { RS = "\n---\n" } /\nkind: (Cluster)?Role(Binding)?\n/ { print; print "---" }' "$1"
}
rbac_of "$d" > "$tmp/defaults-rbac.yaml"
expect "$tmp/defaults-rbac.yaml" '^kind: ClusterRole$' "RBAC objects found for the scan"
reject "$tmp/defaults-rbac.yaml" '^kind: FlowSchema$' "the RBAC scan holds no FlowSchema"
reject "$d" 'cluster-admin' "no cluster-admin"
reject "$tmp/defaults-rbac.yaml" "verbs: \[[^]]*['\"]?\*" "no wildcard verbs"
reject "$tmp/defaults-rbac.yaml" "(resources|apiGroups): \[[^]]*['\"]\*['\"]" "no wildcard resources or groups"
reject "$tmp/defaults-rbac.yaml" "^ *- ['\"]?\*['\"]? *$" "no wildcard list items"
expect "$d" '^kind: FlowSchema$' "FlowSchema for the scheduler's requests"
expect "$d" '^    name: workload-high$' "FlowSchema: kube-scheduler's priority level"
expect "$d" '^  matchingPrecedence: 850$' "FlowSchema: precedence after kube-scheduler's (800), before service-accounts (9000)"
grep -A3 'kind: ServiceAccount$' "$d" | grep -q 'name: vramslice-scheduler$' || fail "FlowSchema: subject is not the scheduler's service account"
ok "FlowSchema: subject is the scheduler's service account"
"$HELM" template vramslice "$CHART" "${KV[@]}" --set scheduler.flowSchema.enabled=false > "$tmp/no-fs.yaml"
reject "$tmp/no-fs.yaml" '^kind: FlowSchema$' "scheduler.flowSchema.enabled=false: no FlowSchema"
# Users bound to view/edit/admin cluster-wide read GpuNodes (kubectl get gpunodes, kubectl vramslice).
awk 'BEGIN { RS = "\n---\n" } /\n  name: vramslice-gpunode-reader\n/ && /\nkind: ClusterRole\n/ { print }' "$d" > "$tmp/reader.yaml"
for agg in view edit admin; do
  expect "$tmp/reader.yaml" "^    rbac\.authorization\.k8s\.io/aggregate-to-$agg: \"true\"$" "gpunode-reader ClusterRole aggregates to $agg"
done
expect "$tmp/reader.yaml" '^    resources: \[gpunodes\]$' "gpunode-reader ClusterRole: gpunodes only"
expect "$tmp/reader.yaml" '^    verbs: \[get, list, watch\]$' "gpunode-reader ClusterRole: get/list/watch only"
[[ "$(grep -c '^  name: vramslice-gpunode-reader$' "$d")" == 1 ]] || fail "gpunode-reader: a binding rendered without rbac.gpuNodeReaders"
ok "gpunode-reader: no ClusterRoleBinding without rbac.gpuNodeReaders"
"$HELM" template vramslice "$CHART" "${KV[@]}" --set 'rbac.gpuNodeReaders[0].kind=Group' --set 'rbac.gpuNodeReaders[0].name=ml-team' \
  --set 'rbac.gpuNodeReaders[1].kind=ServiceAccount' --set 'rbac.gpuNodeReaders[1].name=ci' --set 'rbac.gpuNodeReaders[1].namespace=ml' > "$tmp/readers.yaml"
awk 'BEGIN { RS = "\n---\n" } /\nkind: ClusterRoleBinding\n/ && /\n  name: vramslice-gpunode-reader\n/ { print }' "$tmp/readers.yaml" > "$tmp/readers-crb.yaml"
expect "$tmp/readers-crb.yaml" '^  - kind: Group$' "rbac.gpuNodeReaders: ClusterRoleBinding to the listed Group"
expect "$tmp/readers-crb.yaml" '^    namespace: "ml"$' "rbac.gpuNodeReaders: ServiceAccount subject keeps its namespace"
"$HELM" template vramslice "$CHART" "${KV[@]}" --set rbac.create=false > "$tmp/no-rbac.yaml"
reject "$tmp/no-rbac.yaml" 'gpunode-reader' "rbac.create=false: no gpunode-reader"
# The extender creates no Events (kube-scheduler's come from system:kube-scheduler).
awk 'BEGIN { RS = "\n---\n" } /\nkind: ClusterRole\n/ && /\n  name: vramslice-scheduler-extender\n/ { print }' "$d" > "$tmp/extender-role.yaml"
expect "$tmp/extender-role.yaml" 'resources: \[pods/binding\]' "extender ClusterRole found"
reject "$tmp/extender-role.yaml" 'resources: \[[^]]*events' "extender ClusterRole grants no events"
h="$tmp/ha.yaml"
expect "$h" 'leaderElect: true' "replicas > 1: leader election"
expect "$h" 'kind: PodDisruptionBudget' "replicas > 1: PDB"
expect "$h" 'unhealthyPodEvictionPolicy: AlwaysAllow' "PDB never blocks evicting a crash-looping replica"
expect "$h" 'resourceNames: \[vramslice-scheduler\]' "lease RBAC limited to the scheduler's Lease"
expect "$tmp/spread-512mi.yaml" 'name: vramslice.io/vram-512mib' "512Mi unit renames the resource"
expect "$tmp/cert-manager.yaml" 'cert-manager.io/inject-ca-from: vramslice-system/[a-z-]*webhook-ca$' \
  "cert-manager: the chart's CA, not the serving certificate, is injected (renewals keep the bundle)"
expect "$tmp/cert-manager.yaml" '^  isCA: true$' "cert-manager: the chart's CA Certificate is a CA"
expect "$tmp/cert-manager.yaml" '^    rotationPolicy: Never$' "cert-manager: the CA keeps its key when renewed"
expect "$tmp/cert-manager.yaml" '^  ca:$' "cert-manager: a CA Issuer signs the serving certificate"
expect "$tmp/cert-manager-issuer.yaml" 'cert-manager.io/inject-ca-from: vramslice-system/[a-z-]*webhook$' \
  "cert-manager with the user's issuer: the serving certificate's CA is injected"
expect "$tmp/cert-manager-issuer.yaml" 'name: corp-ca' "cert-manager with the user's issuer: it signs"
reject "$tmp/cert-manager-issuer.yaml" 'isCA: true' "cert-manager with the user's issuer: no CA of the chart's"
expect "$tmp/cert-manager.yaml" 'kind: ServiceMonitor' "ServiceMonitor rendered on request"
reject "$tmp/no-webhook.yaml" 'MutatingWebhookConfiguration' "webhook off: no webhook configuration"
expect "$tmp/fake-gpus.yaml" 'heartbeat: 10s' "extraConfig merges into the plugin config"
reject "$d" 'kind: DeviceClass' "device-plugin mode: no DeviceClass"
reject "$d" 'mode: dra|resourceslices|plugins_registry' "device-plugin mode: no DRA config, RBAC or mounts"

# DRA mode: the node agent is a DRA driver; kube-scheduler places claims, so no extender,
# bundled scheduler or webhook unless dra.deployExtender.
r="$tmp/dra.yaml"
expect "$r" '^kind: DeviceClass$' "dra: DeviceClass rendered"
expect "$r" '^apiVersion: resource\.k8s\.io/v1$' "dra: DeviceClass is resource.k8s.io/v1"
expect "$r" '^  name: vram\.vramslice\.io$' "dra: DeviceClass vram.vramslice.io"
expect "$r" 'expression: device\.driver == "vramslice\.io" && device\.attributes\["vramslice\.io"\]\.healthy$' \
  "dra: DeviceClass selects driver vramslice.io's healthy GPUs by CEL"
expect "$r" '^    mode: dra$' "dra: the node agent's config says mode: dra"
expect "$r" 'registryDir: /var/lib/kubelet/plugins_registry$' "dra: config registryDir"
expect "$r" 'pluginDir: /var/lib/kubelet/plugins/vramslice\.io$' "dra: config pluginDir"
expect "$r" 'checkpoint: /var/lib/vramslice/dra/checkpoint\.json$' "dra: checkpoint under hostDir"
expect "$r" 'mountPath: /var/lib/kubelet/plugins_registry$' "dra: DaemonSet mounts plugins_registry"
expect "$r" 'mountPath: /var/lib/kubelet/plugins/vramslice\.io$' "dra: DaemonSet mounts plugins/vramslice.io"
expect "$r" 'mountPath: /var/run/cdi$' "dra: DaemonSet mounts the CDI directory"
grep -A2 'path: /var/run/cdi$' "$r" | grep -q 'type: DirectoryOrCreate' || fail "dra: CDI hostPath is not DirectoryOrCreate"
ok "dra: CDI hostPath DirectoryOrCreate"
expect "$r" 'mountPath: /var/lib/vramslice$' "dra: DaemonSet keeps the hostDir mount (guard, accounting, checkpoint)"
expect "$r" 'accountingRoot: /var/lib/vramslice/accounting$' "dra: accounting root kept"
# shellcheck disable=SC2016 # the pattern is the rendered shell text, $dir unexpanded
expect "$r" 'mkdir -p "\$dir/lib" "\$dir/accounting" "\$dir/dra"' "dra: init container creates the checkpoint directory"
reject "$r" '(mountPath|path): .*/device-plugins$' "dra: no device-plugins mount"
reject "$r" 'socketDir:' "dra: no device-plugin socket in the config"
reject "$r" '^kind: (Deployment|MutatingWebhookConfiguration|PodDisruptionBudget|NetworkPolicy)$' "dra: no scheduler, webhook, PDB or extender NetworkPolicy"
reject "$r" 'vramslice-(scheduler|extender|webhook)' "dra: no extender, vramslice-scheduler or webhook objects"
expect "$r" 'name: vramslice-device-plugin$' "dra: ServiceMonitor for the node agent"
expect "$r" 'resources: \[resourceslices\]' "dra: RBAC on resourceslices"
expect "$r" 'verbs: \[get, create, update\]' "dra: resourceslices get/create/update only"
expect "$r" 'resources: \[resourceclaims\]' "dra: RBAC reads resourceclaims"
expect "$r" '^kind: ValidatingAdmissionPolicy$' "dra: ValidatingAdmissionPolicy keeps slice writes on the agent's node"
expect "$r" 'system:serviceaccount:vramslice-system:vramslice-device-plugin"$' "dra: the policy matches the node agent's service account"
reject "$r" 'cluster-admin' "dra: no cluster-admin"
reject "$r" "verbs: \[[^]]*['\"]?\*" "dra: no wildcard verbs"
reject "$r" "(resources|apiGroups|apiVersions): \[[^]]*['\"]?\*" "dra: no wildcard resources, groups or versions"
x="$tmp/dra-extender.yaml"
expect "$x" '^kind: Deployment$' "dra.deployExtender: scheduler Deployment rendered"
expect "$x" '^kind: MutatingWebhookConfiguration$' "dra.deployExtender: webhook rendered"
expect "$x" '^kind: DeviceClass$' "dra.deployExtender: DeviceClass still rendered"
expect "$x" 'publishThreshold: 2Gi$' "dra: publishThreshold passed through"
expect "$x" 'registryDir: /var/lib/k0s/kubelet/plugins_registry$' "dra: plugin directories follow kubeletRootDir"
reject "$x" 'name: vramslice-device-plugin-resourceslices' "dra.slicePolicy=false: no slice policy"
expect "$d" 'name: vramslice-device-plugin-gpunodes$' "a ValidatingAdmissionPolicy keeps GpuNode writes on the agent's node"
expect "$d" 'resources: \[gpunodes, gpunodes/status\]' "the GpuNode policy covers the status subresource"
"$HELM" template vramslice "$CHART" "${KV[@]}" --set devicePlugin.gpuNodePolicy=false > "$tmp/no-gpunode-policy.yaml"
reject "$tmp/no-gpunode-policy.yaml" '^kind: ValidatingAdmissionPolicy' "devicePlugin.gpuNodePolicy=false: no policy"
if "$HELM" template vramslice "$CHART" --kube-version v1.33.5 --set mode=dra > /dev/null 2> "$tmp/err.log"; then
  fail "mode: dra rendered for Kubernetes 1.33 (resource.k8s.io/v1 needs 1.34)"
fi
grep -q 'mode: dra needs Kubernetes 1.34' "$tmp/err.log" || { cat "$tmp/err.log"; fail "unexpected error for dra on 1.33"; }
ok "dra: Kubernetes older than 1.34 refused"

expect "$tmp/netpol.yaml" 'kind: NetworkPolicy' "NetworkPolicy rendered on request"
reject "$d" 'kind: NetworkPolicy' "no NetworkPolicy by default"
"$HELM" template vramslice "$CHART" "${KV[@]}" --set networkPolicy.enabled=true > "$tmp/netpol-closed.yaml"
reject "$tmp/netpol-closed.yaml" 'from: \[\]' "NetworkPolicy without metricsFrom has no empty (admit-all) from"
expect "$tmp/netpol.yaml" 'team: monitoring' "NetworkPolicy admits the metricsFrom peers"
if "$HELM" template vramslice "$CHART" --kube-version v1.29.9 > /dev/null 2>&1; then
  fail "the chart installed on Kubernetes 1.29 (webhook matchConditions need 1.30)"
fi
ok "Kubernetes older than 1.30 refused (Chart.yaml kubeVersion)"

# values.schema.json must turn these away at install time.
bad=(
  "--set unit=1G"
  "--set extender.policy=fastest"
  "--set devicePlugin.injection.mode=env"
  "--set devicePlugin.deviceListStrategy=volume"
  "--set scheduler.replicas=0"
  "--set extender.headroom=lots"
  "--set extender.staleness=90"
  "--set scheduler.name=other"
  "--set typo=true"
  "--set devicePlugin.pollIntervall=1s"
  "--set mode=DRA"
  "--set dra.headroom=lots"
  "--set dra.publishThreshold=1G1"
  "--set dra.minPublishInterval=2"
  "--set dra.cdiDir=var/run/cdi"
  "--set dra.registryDir=/x"
  "--set scheduler.flowSchema.matchingPrecedence=0"
  "--set scheduler.flowSchema.priority=high"
  "--set webhook.failurePolicy=ignore"
  "--set rbac.gpuNodeReaders[0].kind=Role --set rbac.gpuNodeReaders[0].name=x"
  "--set rbac.gpuNodeReaders[0].kind=ServiceAccount --set rbac.gpuNodeReaders[0].name=ci"
  "--set webhook.certManager.enabled=true --set webhook.certManager.issuerRef.kind=ClusterIssuer"
  "--set listenHost=[::]"
  "--set-string listenHost="
)
for b in "${bad[@]}"; do
  # shellcheck disable=SC2086
  if "$HELM" template vramslice "$CHART" $b "${KV[@]}" > /dev/null 2> "$tmp/err.log"; then
    fail "values.schema.json accepted bad values: $b"
  fi
  grep -q "values don't meet the specifications of the schema" "$tmp/err.log" || { cat "$tmp/err.log"; fail "unexpected error for $b"; }
  ok "rejected: $b"
done

# Values the schema cannot judge alone, refused by the templates with a message naming them
# (otherwise the install succeeds and the extender, or cert-manager, fails at run time).
refused=(
  "--set scheduler.replicas=2 --set scheduler.leaderElection.enabled=false|would run 2 active schedulers"
  "--set scheduler.replicas=2 --set scheduler.podDisruptionBudget.minAvailable=2|minAvailable=2 with scheduler.replicas=2 would let no scheduler pod be evicted"
  "--set webhook.caValidity=720h|webhook.certValidity=2160h is longer than webhook.caValidity=720h"
  "--set webhook.certValidity=1h30m500ms --set webhook.caValidity=1h30m|is longer than webhook.caValidity"
  "--set webhook.certValidity=0s|webhook.certValidity=0s is below 1h"
  "--set webhook.certValidity=59m59s|webhook.certValidity=59m59s is below 1h"
  "--set webhook.certManager.enabled=true --set webhook.certValidity=30m|is below 1h"
  "--set extender.extraConfig.webhook.checkInterval=6m21s --set webhook.certValidity=1h|webhook.certValidity=1h is too short for the extender's webhook.checkInterval=6m21s: it must be at least 3609s"
  "--set extender.extraConfig.webhook.checkInterval=10m --set extender.extraConfig.webhook.selfSigned.certValidity=90m|webhook.certValidity=90m is too short"
  "--set extender.extraConfig.webhook.checkInterval=often|extender.extraConfig.webhook.checkInterval=often is not a duration"
  "--set extender.extraConfig.webhook.checkInterval=0s|extender.extraConfig.webhook.checkInterval=0s must be greater than zero"
  "--set extender.extraConfig.webhook.checkInterval=0|extender.extraConfig.webhook.checkInterval=0 is not a duration"
  "--set extender.extraConfig.webhook.selfSigned.caValidity=100h|webhook.selfSigned.certValidity=2160h is longer than its caValidity=100h"
  "--set extender.extraConfig.webhook.selfSigned.caValidity=forever|webhook.selfSigned.caValidity=forever is not a duration"
  "--skip-schema-validation --set webhook.failurePolicy=Open|webhook.failurePolicy=Open must be Fail or Ignore"
  "--skip-schema-validation --set rbac.gpuNodeReaders[0].kind=ServiceAccount --set rbac.gpuNodeReaders[0].name=ci|ServiceAccount \"ci\" needs a namespace"
)
for r in "${refused[@]}"; do
  args="${r%%|*}"; want="${r#*|}"
  # shellcheck disable=SC2086
  if "$HELM" template vramslice "$CHART" $args "${KV[@]}" > /dev/null 2> "$tmp/err.log"; then
    fail "rendered with values that must be refused: $args"
  fi
  grep -qF -- "$want" "$tmp/err.log" || { cat "$tmp/err.log"; fail "unexpected error for $args"; }
  ok "refused: $args"
done
"$HELM" template vramslice "$CHART" "${KV[@]}" --set webhook.certValidity=90m --set webhook.caValidity=1.5h > /dev/null \
  || fail "equal certificate and CA validities written differently were refused"
ok "webhook validities compared as durations (90m = 1.5h)"
"$HELM" template vramslice "$CHART" "${KV[@]}" --set webhook.certValidity=1h \
  --set extender.extraConfig.webhook.checkInterval=6m20s > /dev/null \
  || fail "a certificate validity exactly at the extender's floor for its check interval was refused"
ok "the extender's certificate floor is applied to checkInterval set through extraConfig (6m20s: 1h)"

# The longest release name Helm allows: every object name stays a 63-character DNS label and
# keeps its component's suffix.
long="$(printf 'r%.0s' {1..53})"
"$HELM" template "$long" "$CHART" "${KV[@]}" --set metrics.serviceMonitor.enabled=true > "$tmp/long.yaml"
python3 - "$tmp/long.yaml" <<'PY' || fail "a 53-character release name gives names over 63 characters"
import re, sys
names = {}
kind = None
for doc in open(sys.argv[1]).read().split("\n---"):
    k = re.search(r"^kind: (\S+)$", doc, re.M)
    n = re.search(r"^metadata:\n(?:  .*\n)*?  name: (\S+)$", doc, re.M)
    if k and n and k.group(1) in ("Service", "DaemonSet", "Deployment", "ServiceMonitor", "MutatingWebhookConfiguration", "Secret"):
        names[(k.group(1), n.group(1))] = len(n.group(1))
long = {kn: l for kn, l in names.items() if l > 63}
assert names and not long, long or "no names found"
services = [n for k, n in names if k == "Service"]
assert len(set(services)) == len(services) == 3, services
assert any(n.endswith("-webhook") for n in services), services
PY
ok "a 53-character release name keeps every name within 63 characters"

# The Grafana dashboard is valid JSON and uses only metrics docs/metrics.md lists.
python3 -m json.tool "$ROOT/dashboards/vramslice.json" > /dev/null || fail "dashboards/vramslice.json is not valid JSON"
ok "dashboards/vramslice.json is valid JSON"
while read -r m; do
  grep -q "\`$m" "$ROOT/docs/metrics.md" || fail "dashboard metric $m is not documented in docs/metrics.md"
done < <(grep -o 'vramslice_[a-z_]*' "$ROOT/dashboards/vramslice.json" | sed -E 's/_(bucket|sum|count)$//' | sort -u)
ok "every dashboard metric is documented in docs/metrics.md"

for m in manifests/vramslice.yaml manifests/dra/vramslice.yaml; do
  expect "$ROOT/$m" '^    pod-security\.kubernetes\.io/enforce: privileged$' "$m: the namespace enforces Pod Security level privileged (hostPID, hostPath)"
done
"$ROOT/scripts/render-manifests.sh" --check > "$tmp/drift.log" 2>&1 || { cat "$tmp/drift.log"; fail "manifests/ drift"; }
ok "manifests/vramslice.yaml and manifests/dra/vramslice.yaml match the chart"

echo "chart: $passed passed, 0 failed"
