{{/* Name of the chart, possibly overridden. */}}
{{- define "vramslice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object name. */}}
{{- define "vramslice.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "vramslice.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "vramslice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: include with (dict "ctx" . "component" "x"). */}}
{{- define "vramslice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vramslice.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The extended resource name for the configured unit. */}}
{{- define "vramslice.resourceName" -}}
{{- $names := dict "1Gi" "vramslice.io/vram-gib" "512Mi" "vramslice.io/vram-512mib" "256Mi" "vramslice.io/vram-256mib" "128Mi" "vramslice.io/vram-128mib" -}}
{{- required (printf "unit %q is not one of 1Gi, 512Mi, 256Mi, 128Mi" .Values.unit) (get $names .Values.unit) -}}
{{- end -}}

{{/* Image reference: include with (dict "image" .Values.x.image "ctx" .). */}}
{{- define "vramslice.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* kube-scheduler image: the cluster's version unless a tag is given. */}}
{{- define "vramslice.schedulerImage" -}}
{{- $tag := .Values.scheduler.image.tag -}}
{{- if not $tag -}}
{{- $tag = regexFind "^v[0-9]+\\.[0-9]+\\.[0-9]+" .Capabilities.KubeVersion.Version -}}
{{- end -}}
{{- printf "%s:%s" .Values.scheduler.image.repository (required "scheduler.image.tag: cannot derive the cluster version; set it" $tag) -}}
{{- end -}}

{{/* Whether the scheduler runs leader election. More than one replica without it would be as
many active schedulers, each calling its own extender with its own ledger: they would promise
one GPU's units twice. `auto` is on whatever the replicas: scaling from one replica to more then
never rolls electing pods out beside one that does not elect (which would schedule on, while a
new pod took the free lease). */}}
{{- define "vramslice.leaderElect" -}}
{{- $le := .Values.scheduler.leaderElection.enabled -}}
{{- $replicas := int .Values.scheduler.replicas -}}
{{- if eq (toString $le) "auto" -}}
true
{{- else if and (eq (toString $le) "false") (gt $replicas 1) -}}
{{- fail (printf "scheduler.replicas=%d with scheduler.leaderElection.enabled=false would run %d active schedulers, each with its own extender ledger, and double-book GPUs: enable leader election (or leave it auto) or run one replica" $replicas $replicas) -}}
{{- else -}}
{{- toString $le -}}
{{- end -}}
{{- end -}}

{{/* A Go duration ("2160h", "1h30m", "0.5h", "500ms") in milliseconds, as a float; the schema
has checked its form. */}}
{{- define "vramslice.durationMs" -}}
{{- $total := 0.0 -}}
{{- $perUnit := dict "ms" 1.0 "s" 1000.0 "m" 60000.0 "h" 3600000.0 -}}
{{- range regexFindAll "[0-9]+(\\.[0-9]+)?(ms|s|m|h)" . -1 -}}
{{- $unit := regexFind "(ms|s|m|h)$" . -}}
{{- $total = addf $total (mulf (float64 (trimSuffix $unit .)) (get $perUnit $unit)) -}}
{{- end -}}
{{- $total -}}
{{- end -}}

{{/* Fails on webhook certificate validities the extender (self-signed) or cert-manager would
refuse at run time, where a mistake would stop the scheduler's pod instead of the install. */}}
{{- define "vramslice.checkWebhookValidity" -}}
{{- $wh := .Values.webhook -}}
{{- $cert := float64 (include "vramslice.durationMs" $wh.certValidity) -}}
{{- $ca := float64 (include "vramslice.durationMs" $wh.caValidity) -}}
{{- if lt $cert 3600000.0 -}}
{{- fail (printf "webhook.certValidity=%s is below 1h: the certificate is renewed with a third of it left and checked once a minute (cert-manager refuses less than 1h too)" $wh.certValidity) -}}
{{- end -}}
{{- /* caValidity bounds the serving certificate unless cert-manager signs with an issuer of the user's. */ -}}
{{- if and (not (and $wh.certManager.enabled $wh.certManager.issuerRef)) (gt $cert $ca) -}}
{{- fail (printf "webhook.certValidity=%s is longer than webhook.caValidity=%s; it must not be" $wh.certValidity $wh.caValidity) -}}
{{- end -}}
{{- end -}}

{{/* Fails on the extender's webhook settings as merged with extender.extraConfig, by the rules the
extender applies when it starts (WebhookConfig::validate): a duration it cannot read, or a
self-signed certificate longer than its CA or too short for its check interval (a third of it must span three checks
and three times the new CA's 60 s propagation wait). Include with the merged `webhook` dict. */}}
{{- define "vramslice.checkMergedWebhook" -}}
{{- $form := "^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$" -}}
{{- $check := ternary (toString .checkInterval) "1m" (hasKey . "checkInterval") -}}
{{- if not (regexMatch $form $check) -}}
{{- fail (printf "extender.extraConfig.webhook.checkInterval=%s is not a duration such as 30s, 1m or 1h30m" $check) -}}
{{- end -}}
{{- if eq (float64 (include "vramslice.durationMs" $check)) 0.0 -}}
{{- fail (printf "extender.extraConfig.webhook.checkInterval=%s must be greater than zero" $check) -}}
{{- end -}}
{{- with .selfSigned -}}
{{- range $field := list "certValidity" "caValidity" -}}
{{- $value := toString (get $.selfSigned $field) -}}
{{- if and $value (not (regexMatch $form $value)) -}}
{{- fail (printf "the extender's webhook.selfSigned.%s=%s is not a duration such as 720h or 1h30m" $field $value) -}}
{{- end -}}
{{- end -}}
{{- $cert := float64 (include "vramslice.durationMs" (toString .certValidity)) -}}
{{- if gt $cert (float64 (include "vramslice.durationMs" (toString .caValidity))) -}}
{{- fail (printf "the extender's webhook.selfSigned.certValidity=%s is longer than its caValidity=%s; it must not be" (toString .certValidity) (toString .caValidity)) -}}
{{- end -}}
{{- $floor := addf (mulf 9.0 (float64 (include "vramslice.durationMs" $check))) 180000.0 -}}
{{- if lt $cert $floor -}}
{{- fail (printf "webhook.certValidity=%s is too short for the extender's webhook.checkInterval=%s: it must be at least %.0fs (a third of it spans three checks and the CA's 60s propagation wait)" (toString .certValidity) $check (divf $floor 1000.0)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The name of one component's objects: the release's prefix, cut so that the whole stays a
63-character DNS label with the suffix intact (two components never share a name). Include
with (dict "ctx" . "suffix" "device-plugin"). */}}
{{- define "vramslice.componentName" -}}
{{- $prefix := include "vramslice.fullname" .ctx | trunc (int (sub 62 (len .suffix))) | trimSuffix "-" -}}
{{- printf "%s-%s" $prefix .suffix -}}
{{- end -}}

{{/* Object names. */}}
{{- define "vramslice.devicePluginName" -}}{{ include "vramslice.componentName" (dict "ctx" . "suffix" "device-plugin") }}{{- end -}}
{{- define "vramslice.schedulerName" -}}{{ include "vramslice.componentName" (dict "ctx" . "suffix" "scheduler") }}{{- end -}}
{{- define "vramslice.webhookName" -}}{{ include "vramslice.componentName" (dict "ctx" . "suffix" "webhook") }}{{- end -}}
{{/* The webhook's TLS Secret: one name per certificate source. cert-manager's Secret is not the
release's (Helm would refuse to adopt it when cert-manager is turned off) and the chart's own
would be taken over by cert-manager when it is turned on, so switching never finds the other's. */}}
{{- define "vramslice.webhookSecretName" -}}
{{- if .Values.webhook.certManager.enabled -}}
{{ include "vramslice.componentName" (dict "ctx" . "suffix" "webhook-cm-tls") }}
{{- else -}}
{{ include "vramslice.componentName" (dict "ctx" . "suffix" "webhook-tls") }}
{{- end -}}
{{- end -}}

{{/* "true" in DRA mode (the node agent is a DRA driver), "" in device-plugin mode. */}}
{{- define "vramslice.dra" -}}
{{- if eq .Values.mode "dra" }}true{{ end -}}
{{- end -}}

{{/* "true" when the scheduler Deployment (extender + vramslice-scheduler) is rendered: always in
device-plugin mode; in DRA mode only with dra.deployExtender (kube-scheduler's DynamicResources
plugin places claims there). */}}
{{- define "vramslice.schedulerEnabled" -}}
{{- if or (ne .Values.mode "dra") .Values.dra.deployExtender }}true{{ end -}}
{{- end -}}

{{/* "true" when the webhook is rendered: webhook.enabled, and the extender that serves it is. */}}
{{- define "vramslice.webhookEnabled" -}}
{{- if and .Values.webhook.enabled (include "vramslice.schedulerEnabled" .) }}true{{ end -}}
{{- end -}}

{{/* The address a listener on the pod IP binds (metrics, probes, the webhook): `listenHost` and
`.port`, an IPv6 host in brackets. Call with (dict "root" $ "port" N). */}}
{{- define "vramslice.podListenAddr" -}}
{{- $host := .root.Values.listenHost -}}
{{- if contains ":" $host -}}
{{- printf "[%s]:%d" $host (int .port) -}}
{{- else -}}
{{- printf "%s:%d" $host (int .port) -}}
{{- end -}}
{{- end -}}
