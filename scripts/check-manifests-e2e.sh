#!/usr/bin/env bash
# Against the e2e cluster's real kube-apiserver (e2e/bin/vramslice-cluster --control-plane-only):
#  1. every object of manifests/ (both modes; and of the chart's HA and 128Mi/no-webhook renderings) passes a
#     server-side dry-run apply, so it is schema-valid there (CEL matchConditions included);
#  2. the GpuNode ValidatingAdmissionPolicy lets the node agent (impersonated with the node-name
#     extra of a pod-bound token) write its own node's GpuNode and status and refuses others;
#  3. helm install, upgrade and uninstall of the chart work there, an upgrade keeps the
#     webhook certificate the extender wrote (Secret data and caBundle), and the upgrade that
#     turns leader election on replaces unelected pods (Recreate) before later ones roll;
#  4. the webhook, served by this machine (crates/vramslice-webhook/examples/serve_local.rs) with
#     the chart's own MutatingWebhookConfiguration pointed at https://localhost, mutates exactly
#     the pods it should; when it is down (failurePolicy Fail, the default) a VRAM pod is refused
#     naming the webhook while a pod without VRAM is still admitted (matchConditions skip it).
#
#   scripts/check-manifests-e2e.sh
#
# Needs Go (to build the e2e launcher and kubectl when missing) and cargo.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER_BIN="${VRAMSLICE_CLUSTER_BIN:-$ROOT/e2e/bin/vramslice-cluster}"
HELM="${HELM:-$("$ROOT/scripts/install-helm.sh")}"
# The launcher and kubectl v1.37.2 come from the e2e module (make -C e2e go builds both).
if [[ ! -x "$CLUSTER_BIN" || ! -x "$ROOT/e2e/bin/kubectl" ]]; then
  make -C "$ROOT/e2e" go > /dev/null
fi
export PATH="$ROOT/e2e/bin:$PATH"
command -v kubectl >/dev/null || { echo "check-manifests-e2e: kubectl is not on PATH" >&2; exit 1; }
cargo build -q -p vramslice-webhook --example serve_local
WEBHOOK_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/examples/serve_local"

work="$(mktemp -d)"
cluster_pid=""; webhook_pid=""
cleanup() {
  [[ -n "$webhook_pid" ]] && kill "$webhook_pid" 2>/dev/null || true
  if [[ -n "$cluster_pid" ]]; then
    kill -INT "$cluster_pid" 2>/dev/null || true
    wait "$cluster_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

passed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
fail() { echo "FAIL $*" >&2; echo "$passed passed, 1 failed"; exit 1; }

"$CLUSTER_BIN" --control-plane-only --dir "$work/cluster" > "$work/cluster.log" 2>&1 &
cluster_pid=$!
export KUBECONFIG="$work/cluster/admin.kubeconfig"
for _ in $(seq 1 240); do
  grep -q '^cluster is running' "$work/cluster.log" && break
  kill -0 "$cluster_pid" 2>/dev/null || { tail -20 "$work/cluster.log"; fail "e2e control plane exited"; }
  sleep 0.5
done
grep -q '^cluster is running' "$work/cluster.log" || fail "e2e control plane not up in 120 s"
ok "e2e control plane up"

kubectl apply --server-side -f "$ROOT/manifests/crds/" > /dev/null
kubectl get namespace vramslice-system > /dev/null 2>&1 || kubectl create namespace vramslice-system > /dev/null

dry_run() { # file, name
  local out objects accepted
  out="$(kubectl apply --dry-run=server --server-side --force-conflicts -f "$1" 2>&1)" || { echo "$out"; fail "server-side dry-run of $2"; }
  objects="$(grep -c '^kind:' "$1")"
  accepted="$(grep -c 'server dry run' <<<"$out")"
  [[ "$objects" == "$accepted" ]] || { echo "$out"; fail "$2: $accepted of $objects objects accepted"; }
  ok "server-side dry-run of $2: $accepted objects accepted"
}
dry_run "$ROOT/manifests/vramslice.yaml" "manifests/vramslice.yaml"
dry_run "$ROOT/manifests/dra/vramslice.yaml" "manifests/dra/vramslice.yaml (mode: dra)"
"$HELM" template vramslice "$ROOT/charts/vramslice" -n vramslice-system --kube-version v1.37.2 \
  --set scheduler.replicas=3 --set networkPolicy.enabled=true > "$work/ha.yaml"
dry_run "$work/ha.yaml" "chart with scheduler.replicas=3 and a NetworkPolicy"
"$HELM" template vramslice "$ROOT/charts/vramslice" -n vramslice-system --kube-version v1.37.2 \
  --set unit=128Mi --set webhook.enabled=false --set devicePlugin.deviceListStrategy=cdi > "$work/small.yaml"
dry_run "$work/small.yaml" "chart with unit=128Mi, no webhook"

# The GpuNode policy, enforced: the node agent's identity (impersonated, with the node-name extra
# a pod-bound token carries) writes its own node's GpuNode and status, and nothing else.
awk 'BEGIN { RS = "\n---\n"; ORS = "\n---\n" }
  /\n  name: vramslice-device-plugin(-gpunodes)?\n/ && /kind: (ServiceAccount|ClusterRole|ClusterRoleBinding|ValidatingAdmissionPolicy|ValidatingAdmissionPolicyBinding)\n/' \
  "$ROOT/manifests/vramslice.yaml" > "$work/agent.yaml"
[[ "$(grep -c '^kind: ValidatingAdmissionPolicy' "$work/agent.yaml")" == 2 ]] || fail "the GpuNode policy is not in manifests/vramslice.yaml"
kubectl apply -f "$work/agent.yaml" > /dev/null 2>&1
# kubectl patch reads the object first; the agent itself patches without reading.
kubectl create clusterrole check-gpunode-status-get --verb=get --resource=gpunodes.vramslice.io/status > /dev/null
kubectl create clusterrolebinding check-gpunode-status-get --clusterrole=check-gpunode-status-get \
  --serviceaccount=vramslice-system:vramslice-device-plugin > /dev/null
as_agent=(--as=system:serviceaccount:vramslice-system:vramslice-device-plugin --as-group=system:serviceaccounts)
status='{"status":{"unit":"1Gi","resourceName":"vramslice.io/vram-gib","observedAt":"2026-12-07T12:00:00Z"}}'
gpunode() { printf 'apiVersion: vramslice.io/v1alpha1\nkind: GpuNode\nmetadata: {name: %s}\nspec: {nodeName: %s}\n' "$1" "$1"; }
denied=""
for _ in $(seq 1 50); do # the policy takes effect once the API server has compiled it
  if ! out="$(gpunode node-b | kubectl create "${as_agent[@]}" --as-user-extra=authentication.kubernetes.io/node-name=node-a -f - 2>&1)"; then
    denied="$out"; break
  fi
  kubectl delete gpunode node-b > /dev/null
  sleep 0.2
done
[[ "$denied" == *"may only write the GpuNode of that node, not 'node-b'"* ]] || fail "the agent of node-a wrote node-b's GpuNode: ${denied:-allowed}"
gpunode node-a | kubectl create "${as_agent[@]}" --as-user-extra=authentication.kubernetes.io/node-name=node-a -f - > /dev/null \
  || fail "the agent of node-a cannot create its own GpuNode"
kubectl patch gpunode node-a --subresource=status --type=merge -p "$status" "${as_agent[@]}" \
  --as-user-extra=authentication.kubernetes.io/node-name=node-a > /dev/null || fail "the agent of node-a cannot write its GpuNode's status"
out="$(kubectl patch gpunode node-a --subresource=status --type=merge -p "$status" "${as_agent[@]}" \
  --as-user-extra=authentication.kubernetes.io/node-name=node-b 2>&1)" && fail "the agent of node-b wrote node-a's GpuNode status"
[[ "$out" == *"may only write the GpuNode of that node"* ]] || fail "unexpected refusal: $out"
out="$(gpunode node-c | kubectl create "${as_agent[@]}" -f - 2>&1)" && fail "a token without a node wrote a GpuNode"
[[ "$out" == *"names no node"* ]] || fail "unexpected refusal: $out"
kubectl delete gpunode node-a > /dev/null
kubectl delete validatingadmissionpolicybinding,validatingadmissionpolicy vramslice-device-plugin-gpunodes > /dev/null
kubectl delete clusterrolebinding,clusterrole check-gpunode-status-get > /dev/null
ok "GpuNode policy: the node agent writes its own node's GpuNode and status only (CREATE and status PATCH checked)"

# A real helm install/upgrade/uninstall. The e2e API server is built without version stamps
# (it reports v0.0.0-master), so the chart's kubeVersion constraint is dropped from a copy; the
# release is "vs" so that no name meets the e2e harness's own RBAC objects.
cp -r "$ROOT/charts/vramslice" "$work/chart"
sed -i '/^kubeVersion:/d' "$work/chart/Chart.yaml"
hv=(--set scheduler.image.tag=v1.37.2)
# Installed without leader election (one replica), as an install of a chart before it was the
# default: the upgrade that turns it on must replace those pods, not overlap them.
"$HELM" install vs "$work/chart" -n vs-system --create-namespace "${hv[@]}" \
  --set scheduler.leaderElection.enabled=false > "$work/helm.log" 2>&1 \
  || { cat "$work/helm.log"; fail "helm install"; }
ok "helm install on the e2e API server"
strategy() { kubectl -n vs-system get deployment vs-vramslice-scheduler -o jsonpath='{.spec.strategy.type}'; }
[[ "$(strategy)" == Recreate ]] || fail "without leader election the Deployment is not Recreate: $(strategy)"
"$WEBHOOK_BIN" "$KUBECONFIG" 18444 vs-system vs-vramslice-webhook-tls vs-vramslice-webhook > "$work/webhook-vs.log" 2>&1 &
webhook_pid=$!
secret_crt() { kubectl -n vs-system get secret vs-vramslice-webhook-tls -o jsonpath='{.data.tls\.crt}'; }
ca_bundle() { kubectl get mutatingwebhookconfiguration vs-vramslice-webhook -o jsonpath='{.webhooks[0].clientConfig.caBundle}'; }
for _ in $(seq 1 100); do [[ -n "$(ca_bundle)" ]] && break; sleep 0.2; done
kill "$webhook_pid" 2>/dev/null || { cat "$work/webhook-vs.log"; fail "the webhook for the chart's release exited early"; }
wait "$webhook_pid" 2>/dev/null || true; webhook_pid=""
crt="$(secret_crt)"; ca="$(ca_bundle)"
[[ -n "$crt" && -n "$ca" ]] || fail "the webhook did not fill the chart's Secret and caBundle"
"$HELM" upgrade vs "$work/chart" -n vs-system "${hv[@]}" --set scheduler.replicas=2 --set extender.policy=spread \
  > "$work/helm.log" 2>&1 || { cat "$work/helm.log"; fail "helm upgrade"; }
[[ "$(secret_crt)" == "$crt" && "$(ca_bundle)" == "$ca" ]] || fail "helm upgrade lost the webhook certificate"
kubectl -n vs-system get pdb vs-vramslice-scheduler > /dev/null || fail "no PodDisruptionBudget after scaling to 2"
ok "helm upgrade keeps the webhook Secret and caBundle, adds the PDB"
[[ "$(strategy)" == Recreate ]] \
  || fail "the upgrade turning leader election on overlaps the unelected pods: $(strategy)"
"$HELM" upgrade vs "$work/chart" -n vs-system "${hv[@]}" --set scheduler.replicas=2 --set extender.policy=spread \
  > "$work/helm.log" 2>&1 || { cat "$work/helm.log"; fail "helm upgrade (again)"; }
[[ "$(strategy)" == RollingUpdate ]] || fail "electing pods are not rolled: $(strategy)"
# An HA install of a chart before the annotation: its RollingUpdate says its pods elect.
kubectl -n vs-system annotate deployment vs-vramslice-scheduler vramslice.io/leader-elect- > /dev/null
"$HELM" upgrade vs "$work/chart" -n vs-system "${hv[@]}" --set scheduler.replicas=2 --set extender.policy=spread \
  > "$work/helm.log" 2>&1 || { cat "$work/helm.log"; fail "helm upgrade (from an unannotated HA install)"; }
[[ "$(strategy)" == RollingUpdate ]] || fail "an HA install of an earlier chart is not rolled: $(strategy)"
ok "turning leader election on replaces the unelected pods (Recreate, read back through lookup); the next upgrade rolls, as does one from an unannotated HA install"
"$HELM" uninstall vs -n vs-system > /dev/null || fail "helm uninstall"
left="$(kubectl get mutatingwebhookconfiguration,clusterrole,clusterrolebinding -o name | grep -c 'vs-vramslice' || true)"
[[ "$left" == 0 && -z "$(kubectl -n vs-system get secret,configmap,deployment,daemonset -o name 2>/dev/null)" ]] \
  || fail "helm uninstall left objects behind"
ok "helm uninstall removes every object (Secret included)"

# The chart's webhook configuration, pointed at this machine instead of the Service.
port=18443
awk '/^kind: MutatingWebhookConfiguration/{p=1} p' "$ROOT/manifests/vramslice.yaml" \
  | sed -e 's/^  name: vramslice-webhook$/  name: vramslice-webhook-e2e/' \
        -e '/^      service:$/,/^        port: 443$/d' \
        -e "s|^    clientConfig:\$|    clientConfig:\n      url: https://localhost:$port/mutate-pods|" \
  | { echo "apiVersion: admissionregistration.k8s.io/v1"; cat; } > "$work/mwc.yaml"
kubectl apply -f "$work/mwc.yaml" > /dev/null || { cat "$work/mwc.yaml"; fail "apply the webhook configuration"; }
kubectl -n vramslice-system create secret generic webhook-e2e-tls > /dev/null
"$WEBHOOK_BIN" "$KUBECONFIG" "$port" vramslice-system webhook-e2e-tls vramslice-webhook-e2e > "$work/webhook.log" 2>&1 &
webhook_pid=$!
for _ in $(seq 1 100); do
  [[ -n "$(kubectl get mutatingwebhookconfiguration vramslice-webhook-e2e -o jsonpath='{.webhooks[0].clientConfig.caBundle}')" ]] && break
  sleep 0.2
done
[[ -n "$(kubectl get mutatingwebhookconfiguration vramslice-webhook-e2e -o jsonpath='{.webhooks[0].clientConfig.caBundle}')" ]] \
  || { cat "$work/webhook.log"; fail "the webhook did not write its CA bundle"; }
ok "webhook wrote its CA bundle into the MutatingWebhookConfiguration"

pod() { # name, limits, extra spec lines, annotations
  cat <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $1, annotations: {$4}}
spec:
  $3
  containers: [{name: c, image: busybox, resources: {limits: {$2}}}]
YAML
}
expect_scheduler() { # name, expected
  local got
  got="$(kubectl get pod "$1" -o jsonpath='{.spec.schedulerName}')"
  [[ "$got" == "$2" ]] || fail "pod $1: schedulerName $got, want $2"
  ok "pod $1: schedulerName $2"
}
pod wh-vram '"vramslice.io/vram-gib": "6"' "" "" | kubectl create -f - > /dev/null
pod wh-none 'cpu: "1"' "" "" | kubectl create -f - > /dev/null
pod wh-zero '"vramslice.io/vram-gib": "0"' "" "" | kubectl create -f - > /dev/null
pod wh-other '"vramslice.io/vram-gib": "6"' "schedulerName: volcano" "" | kubectl create -f - > /dev/null 2> "$work/warn.txt"
pod wh-optout '"vramslice.io/vram-gib": "6"' "" '"vramslice.io/keep-scheduler-name": "true"' | kubectl create -f - > /dev/null
kubectl create -f - > /dev/null <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: wh-init}
spec:
  initContainers: [{name: i, image: busybox, resources: {limits: {"vramslice.io/vram-512mib": "2"}}}]
  containers: [{name: c, image: busybox}]
YAML
expect_scheduler wh-vram vramslice-scheduler
expect_scheduler wh-init vramslice-scheduler
expect_scheduler wh-none default-scheduler
expect_scheduler wh-zero default-scheduler
expect_scheduler wh-other volcano
expect_scheduler wh-optout default-scheduler
grep -q 'names scheduler "volcano"' "$work/warn.txt" || fail "no warning for a VRAM pod of another scheduler"
ok "kubectl shows the webhook's warning for a VRAM pod of another scheduler"

kill "$webhook_pid"; wait "$webhook_pid" 2>/dev/null || true; webhook_pid=""
if pod wh-down '"vramslice.io/vram-gib": "6"' "" "" | kubectl create -f - > /dev/null 2> "$work/down.txt"; then
  fail "a VRAM pod was admitted while the webhook is down (failurePolicy Fail)"
fi
grep -q 'failed calling webhook' "$work/down.txt" || { cat "$work/down.txt"; fail "the refusal does not name the webhook"; }
ok "while the webhook is down a VRAM pod is refused: $(head -c 160 "$work/down.txt")"
pod wh-down-none 'cpu: "1"' "" "" | kubectl create -f - > /dev/null || fail "a pod without VRAM was blocked while the webhook is down"
expect_scheduler wh-down-none default-scheduler

echo "manifests-e2e: $passed passed, 0 failed"
