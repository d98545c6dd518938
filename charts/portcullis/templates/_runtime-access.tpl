{{/*
Runtime access records (values: runtimeAccess; the repository README, "Runtime access records"):
the operator's flags, ports, volumes and the checks of the values. Kept apart from the other
templates; deployment.yaml includes these.
*/}}

{{/* Non-empty when a source of runtime access records is enabled. */}}
{{- define "portcullis.runtimeAccess.enabled" -}}
{{- with .Values.runtimeAccess }}{{ if or .auditWebhook.enabled .vaultAuditSocket.enabled }}true{{ end }}{{ end }}
{{- end }}

{{- define "portcullis.runtimeAccess.validate" -}}
{{- $ra := .Values.runtimeAccess }}
{{- if include "portcullis.runtimeAccess.enabled" . }}
{{- if gt (int .Values.replicaCount) 1 }}
{{- fail "runtimeAccess needs replicaCount: 1. Only the leader listens for audit events, and a Service cannot tell which replica leads: a standby's closed port would lose the events sent to it" }}
{{- end }}
{{- if gt (int .Values.sharding.count) 1 }}
{{- fail "runtimeAccess needs sharding.count: 1. The API server sends its audit events to one webhook, and each shard knows only its own namespaces' stages" }}
{{- end }}
{{- end }}
{{- with $ra.auditWebhook }}
{{- if and .enabled (not .tokenSecret) }}
{{- fail "runtimeAccess.auditWebhook.tokenSecret: name the Secret (in the release namespace) holding the bearer token of the API server's webhook kubeconfig under runtimeAccess.auditWebhook.tokenKey, at least 16 random characters (head -c 32 /dev/urandom | base64)" }}
{{- end }}
{{- if and .enabled (not .tlsSecret) }}
{{- fail "runtimeAccess.auditWebhook.tlsSecret: name a kubernetes.io/tls Secret (in the release namespace) with the webhook's serving certificate; the API server sends its token only over HTTPS, and its webhook kubeconfig needs that certificate's CA" }}
{{- end }}
{{- end }}
{{- with $ra.vaultAuditSocket }}
{{- if and .enabled (not (or .from.cidrs .from.namespaceSelector .from.podSelector)) }}
{{- fail "runtimeAccess.vaultAuditSocket.from: say where Vault runs (cidrs, and/or namespaceSelector and podSelector). The socket has no authentication of its own: a NetworkPolicy lets only Vault reach it" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The flags of `portcullis run`. */}}
{{- define "portcullis.runtimeAccess.args" -}}
{{- if include "portcullis.runtimeAccess.enabled" . }}
{{- $ra := .Values.runtimeAccess }}
{{- if $ra.auditWebhook.enabled }}
- --audit-webhook-addr
- {{ printf "0.0.0.0:%d" (int $ra.auditWebhook.port) | quote }}
- --audit-webhook-token-file
- /etc/portcullis/audit-webhook/token/token
- --audit-webhook-tls-cert-file
- /etc/portcullis/audit-webhook/tls/tls.crt
- --audit-webhook-tls-key-file
- /etc/portcullis/audit-webhook/tls/tls.key
- --audit-max-body-bytes
- {{ int64 $ra.auditWebhook.maxBodyBytes | quote }}
{{- end }}
{{- if $ra.vaultAuditSocket.enabled }}
- --vault-audit-addr
- {{ printf "0.0.0.0:%d" (int $ra.vaultAuditSocket.port) | quote }}
{{- end }}
- --audit-events-per-second
- {{ int64 $ra.eventsPerSecond | quote }}
{{- if not $ra.watchStagePods }}
- --no-watch-stage-pods
{{- end }}
{{- with $ra.thresholds }}
- --access-window
- {{ .window | quote }}
- --access-deny-records-per-minute
- {{ int64 .denyRecordsPerMinute | quote }}
- --access-learning-window
- {{ .learningWindow | quote }}
- --access-spike-factor
- {{ .spikeFactor | quote }}
- --access-spike-min-requests
- {{ int64 .spikeMinRequests | quote }}
- --access-baseline-windows
- {{ int64 .baselineWindows | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* The container's ports. */}}
{{- define "portcullis.runtimeAccess.ports" -}}
{{- with .Values.runtimeAccess }}
{{- if .auditWebhook.enabled }}
- name: audit-webhook
  containerPort: {{ .auditWebhook.port }}
  protocol: TCP
{{- end }}
{{- if .vaultAuditSocket.enabled }}
- name: vault-audit
  containerPort: {{ .vaultAuditSocket.port }}
  protocol: TCP
{{- end }}
{{- end }}
{{- end }}

{{- define "portcullis.runtimeAccess.volumeMounts" -}}
{{- if .Values.runtimeAccess.auditWebhook.enabled }}
- name: audit-webhook-token
  mountPath: /etc/portcullis/audit-webhook/token
  readOnly: true
- name: audit-webhook-tls
  mountPath: /etc/portcullis/audit-webhook/tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "portcullis.runtimeAccess.volumes" -}}
{{- with .Values.runtimeAccess.auditWebhook }}
{{- if .enabled }}
# The API server's bearer token and the webhook's serving certificate; 0440 (decimal 288).
- name: audit-webhook-token
  secret:
    secretName: {{ .tokenSecret }}
    defaultMode: 288
    items:
      - key: {{ .tokenKey }}
        path: token
- name: audit-webhook-tls
  secret:
    secretName: {{ .tlsSecret }}
    defaultMode: 288
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- end }}
{{- end }}
