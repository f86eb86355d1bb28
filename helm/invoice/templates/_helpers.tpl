{{/* Names and labels. */}}
{{- define "invoice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "invoice.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "invoice.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "invoice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "invoice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "invoice.labels" -}}
helm.sh/chart: {{ include "invoice.chart" . }}
{{ include "invoice.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: invoice
{{- end }}

{{/* Labels of one mode's objects; call with (dict "root" $ "mode" "api"). */}}
{{- define "invoice.modeSelectorLabels" -}}
{{ include "invoice.selectorLabels" .root }}
app.kubernetes.io/component: {{ .mode }}
{{- end }}

{{- define "invoice.modeLabels" -}}
{{ include "invoice.labels" .root }}
app.kubernetes.io/component: {{ .mode }}
{{- end }}

{{- define "invoice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "invoice.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "invoice.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The consumer group: configured, else the service code + _CONSUMER (SPEC §6). */}}
{{- define "invoice.groupId" -}}
{{- default (printf "%s_CONSUMER" .Values.config.serviceCode) .Values.config.kafka.groupId }}
{{- end }}

{{/* Termination grace of a mode, never below what its drain needs after the preStop sleep:
     the HTTP drain (20 s) for api; for stream the revoke (15 s), the consumer's close and
     the coordinator (15 s each) and the outbox relay's last send (30 s); for worker and all
     a whole provider call (the worker drain waits for in-flight calls), 5 s more, and the
     relay's last send. */}}
{{- define "invoice.terminationGrace" -}}
{{- $mode := .mode -}}
{{- $values := index .root.Values.modes $mode -}}
{{- $preStop := int .root.Values.preStopSleepSeconds -}}
{{- $floor := add $preStop 25 -}}
{{- if eq $mode "stream" -}}
{{- $floor = add $preStop 75 -}}
{{- else if or (eq $mode "worker") (eq $mode "all") -}}
{{- $floor = add (div (int .root.Values.config.providerTimeoutMs) 1000) 35 $preStop -}}
{{- end -}}
{{- max (int $values.terminationGracePeriodSeconds) $floor -}}
{{- end }}

{{/* A secret-backed variable; call with (dict "root" $ "name" "VAR" "key" "data-key" "optional" bool). */}}
{{- define "invoice.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.secrets.existingSecret }}
      key: {{ .key }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end }}

{{/* A pod's environment; call with (dict "root" $ "mode" "api"): configuration from the
     ConfigMap, secrets by reference; webhook secrets only where the API runs (required there). */}}
{{- define "invoice.env" -}}
{{- $root := .root -}}
{{- $k := $root.Values.secrets.keys -}}
{{- $api := has .mode (list "api" "all") -}}
envFrom:
  - configMapRef:
      name: {{ include "invoice.fullname" $root }}
env:
  # Every process leases its own snowflake worker id: replicas never share one.
  - name: APP_ENV_INVOICE_WORKER_ID
    value: auto
  # The allocator (mimalloc) without transparent huge pages, whatever the node's setting:
  # each purge of its memory made the kernel zero a whole 2 MiB page on the next touch,
  # 15 % of a worker's CPU (the build already stops it asking for them; this covers nodes
  # whose THP setting is `always`).
  - name: MIMALLOC_ALLOW_THP
    value: "0"
  {{- include "invoice.secretEnv" (dict "root" $root "name" "APP_ENV_INVOICE_DATABASE_URL" "key" $k.databaseUrl "optional" false) | nindent 2 }}
  {{- include "invoice.secretEnv" (dict "root" $root "name" "APP_ENV_INVOICE_REDIS_URL" "key" $k.redisUrl "optional" false) | nindent 2 }}
  {{- include "invoice.secretEnv" (dict "root" $root "name" "APP_ENV_INVOICE_CREDENTIALS_KEY" "key" $k.credentialsKey "optional" false) | nindent 2 }}
  {{- include "invoice.secretEnv" (dict "root" $root "name" "APP_ENV_INVOICE_CREDENTIALS_KEY_PREVIOUS" "key" $k.credentialsKeyPrevious "optional" true) | nindent 2 }}
  {{- if hasPrefix "sasl_" $root.Values.config.kafka.securityProtocol }}
  {{- include "invoice.secretEnv" (dict "root" $root "name" "APP_ENV_INVOICE_KAFKA_SASL_PASSWORD" "key" $k.kafkaSaslPassword "optional" false) | nindent 2 }}
  {{- end }}
  {{- if $api }}
  {{- include "invoice.secretEnv" (dict "root" $root "name" "WEBHOOK_SECRET" "key" $k.webhookSecret "optional" false) | nindent 2 }}
  {{- include "invoice.secretEnv" (dict "root" $root "name" "WEBHOOK_SECRET_PREVIOUS" "key" $k.webhookSecretPrevious "optional" true) | nindent 2 }}
  {{- include "invoice.secretEnv" (dict "root" $root "name" "WEBHOOK_INTERNAL_SECRET" "key" $k.webhookInternalSecret "optional" false) | nindent 2 }}
  {{- include "invoice.secretEnv" (dict "root" $root "name" "WEBHOOK_INTERNAL_SECRET_PREVIOUS" "key" $k.webhookInternalSecretPrevious "optional" true) | nindent 2 }}
  {{- end }}
{{- end }}
