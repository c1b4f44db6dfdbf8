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

{{/* Whether the scheduler runs leader election. */}}
{{- define "vramslice.leaderElect" -}}
{{- $le := .Values.scheduler.leaderElection.enabled -}}
{{- if eq (toString $le) "auto" -}}
{{- if gt (int .Values.scheduler.replicas) 1 }}true{{ else }}false{{ end -}}
{{- else -}}
{{- toString $le -}}
{{- end -}}
{{- end -}}

{{/* Object names. */}}
{{- define "vramslice.devicePluginName" -}}{{ include "vramslice.fullname" . }}-device-plugin{{- end -}}
{{- define "vramslice.schedulerName" -}}{{ include "vramslice.fullname" . }}-scheduler{{- end -}}
{{- define "vramslice.webhookName" -}}{{ include "vramslice.fullname" . }}-webhook{{- end -}}
{{- define "vramslice.webhookSecretName" -}}{{ include "vramslice.fullname" . }}-webhook-tls{{- end -}}

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
