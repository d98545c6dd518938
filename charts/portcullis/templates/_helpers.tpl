{{/* The chart name, or nameOverride. */}}
{{- define "portcullis.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: fullnameOverride, else the release name when it already holds the
chart name, else <release>-<chart>. At most 52 characters, so suffixes such as "-namespaced"
still fit a 63-character name.
*/}}
{{- define "portcullis.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Cluster-scoped objects (ClusterRole, ClusterRoleBinding) are shared by every namespace, so their
names carry the release namespace: two releases of the same name in two namespaces do not clash.
*/}}
{{- define "portcullis.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "portcullis.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "portcullis.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator Pods; never change between upgrades. */}}
{{- define "portcullis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "portcullis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
With sharding.count > 1, the suffix of a shard's objects (-shard-<i>) and the label of its Pods;
called with the context of one shard (the root merged with "shard": i). Empty with one shard.
*/}}
{{- define "portcullis.shardSuffix" -}}
{{- if gt (int .Values.sharding.count) 1 }}-shard-{{ .shard }}{{ end }}
{{- end }}

{{- define "portcullis.shardSelectorLabels" -}}
{{ include "portcullis.selectorLabels" . }}
{{- if gt (int .Values.sharding.count) 1 }}
portcullis.dev/shard: {{ .shard | quote }}
{{- end }}
{{- end }}

{{/* Labels on every object of the chart. */}}
{{- define "portcullis.labels" -}}
helm.sh/chart: {{ include "portcullis.chart" . }}
{{ include "portcullis.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: portcullis
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The labels of the `helm test` Pod: none of the operator's selector labels. */}}
{{- define "portcullis.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "portcullis.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: helm-test
{{- end }}

{{- define "portcullis.testLabels" -}}
helm.sh/chart: {{ include "portcullis.chart" . }}
{{ include "portcullis.testSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: portcullis
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "portcullis.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "portcullis.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "portcullis.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Secret holding the decision log's HMAC key, and the key in it. */}}
{{- define "portcullis.auditKeySecret" -}}
{{- default (printf "%s-audit-key" (include "portcullis.fullname" .)) .Values.auditLog.existingSecret }}
{{- end }}

{{/* Non-empty when the operator reads (and, when missing, creates) the key Secret itself. */}}
{{- define "portcullis.operatorMakesKey" -}}
{{- if and (not .Values.auditLog.existingSecret) (eq .Values.auditLog.generateKey "operator") }}true{{ end }}
{{- end }}

{{- define "portcullis.auditKeySecretKey" -}}
{{- if .Values.auditLog.existingSecret }}{{ .Values.auditLog.existingSecretKey }}{{ else }}key{{ end }}
{{- end }}

{{/*
Fails on combinations of values that would render a chart that cannot work.
*/}}
{{- define "portcullis.validate" -}}
{{- if and .Values.auditLog.persistence.enabled (gt (int .Values.replicaCount) 1) }}
{{- fail "auditLog.persistence.enabled needs replicaCount: 1. A ReadWriteOnce volume cannot be mounted by replicas on different nodes, and two operators must never append to one decision log. For high availability keep the emptyDir (auditLog.persistence.enabled: false) and ship the operator's stdout, which carries every record, with your log collector" }}
{{- end }}
{{- if and .Values.watchNamespace (gt (int .Values.sharding.count) 1) }}
{{- fail "watchNamespace and sharding.count > 1 exclude each other: one namespace is never split across shards" }}
{{- end }}
{{- if and .Values.vault.caCert.secret .Values.vault.caCert.configMap }}
{{- fail "vault.caCert: set secret or configMap, not both" }}
{{- end }}
{{- if and .Values.admission.webhook.enabled (gt (int .Values.sharding.count) 1) }}
{{- fail "admission.webhook.enabled and sharding.count > 1 exclude each other: one ValidatingWebhookConfiguration cannot reach every shard (the operator refuses --webhook-addr with --shard-count above 1)" }}
{{- end }}
{{- end }}

{{/* The webhook's Service and the Secret holding its CA and certificate. */}}
{{- define "portcullis.webhookService" -}}
{{ include "portcullis.fullname" . }}-webhook
{{- end }}
{{- define "portcullis.webhookSecret" -}}
{{ include "portcullis.fullname" . }}-webhook-tls
{{- end }}
