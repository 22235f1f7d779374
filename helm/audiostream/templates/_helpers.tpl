{{/*
Names, labels and the values every template derives from. Broker names follow
src/audiostream/topology.py; tests/deploy checks the rendered objects against it.
*/}}

{{- define "audiostream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "audiostream.fullname" -}}
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

{{- define "audiostream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "audiostream.labels" -}}
helm.sh/chart: {{ include "audiostream.chart" . }}
app.kubernetes.io/name: {{ include "audiostream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: audiostream
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels; call with (dict "root" $ "component" "gateway"). */}}
{{- define "audiostream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "audiostream.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "audiostream.image" -}}
{{- $tag := .image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if .root.Values.image.registry -}}
{{- printf "%s/%s:%s" .root.Values.image.registry .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* --- broker ------------------------------------------------------------------------- */}}

{{- define "audiostream.rabbitmqClusterName" -}}
{{- .Values.rabbitmq.cluster.name | default (printf "%s-rabbitmq" (include "audiostream.fullname" .)) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Secret holding the AMQP URL under the key from audiostream.brokerSecretKey. */}}
{{- define "audiostream.brokerSecretName" -}}
{{- if and (eq .Values.rabbitmq.mode "external") .Values.rabbitmq.external.existingSecret -}}
{{- .Values.rabbitmq.external.existingSecret -}}
{{- else -}}
{{- printf "%s-broker" (include "audiostream.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "audiostream.brokerSecretKey" -}}
{{- if and (eq .Values.rabbitmq.mode "external") .Values.rabbitmq.external.existingSecret -}}
{{- .Values.rabbitmq.external.existingSecretKey -}}
{{- else -}}
url
{{- end -}}
{{- end -}}

{{/* The vhost as it appears in the path of an AMQP URL. */}}
{{- define "audiostream.vhostPath" -}}
{{- if eq .Values.rabbitmq.vhost "/" -}}%2F{{- else -}}{{ .Values.rabbitmq.vhost }}{{- end -}}
{{- end -}}

{{/* --- auth -------------------------------------------------------------------------- */}}

{{- define "audiostream.authSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "audiostream.fullname" .)) -}}
{{- end -}}

{{/* --- topology (mirrors audiostream.topology.Topology with its defaults) --------------- */}}

{{- define "audiostream.deadLetterExchange" -}}{{ .Values.topology.prefix }}.dlx{{- end -}}
{{- define "audiostream.deadLetterQueue" -}}{{ .Values.topology.prefix }}.dead{{- end -}}
{{/* Topology.delivery_limit, reply_expires_ms and dead_letter_max_length defaults. */}}
{{- define "audiostream.deliveryLimit" -}}3{{- end -}}
{{- define "audiostream.replyExpiresMs" -}}60000{{- end -}}
{{- define "audiostream.deadLetterMaxLength" -}}10000{{- end -}}

{{/* Environment shared by gateways and workers. */}}
{{- define "audiostream.commonEnv" -}}
- name: AUDIOSTREAM_BROKER
  valueFrom:
    secretKeyRef:
      name: {{ include "audiostream.brokerSecretName" . }}
      key: {{ include "audiostream.brokerSecretKey" . }}
- name: AUDIOSTREAM_PREFIX
  value: {{ .Values.topology.prefix | quote }}
- name: AUDIOSTREAM_JSON_LOGS
  value: "1"
{{- end -}}

{{/* Spread pods over zones and nodes; call with (dict "root" $ "component" "x"). */}}
{{- define "audiostream.topologySpread" -}}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "audiostream.selectorLabels" . | nindent 8 }}
    matchLabelKeys: [pod-template-hash]
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "audiostream.selectorLabels" . | nindent 8 }}
    matchLabelKeys: [pod-template-hash]
{{- end -}}

{{/* Cross-value checks JSON Schema cannot express. */}}
{{- define "audiostream.validate" -}}
{{- $ga := .Values.gateway.autoscaling -}}
{{- if and $ga.enabled (ge (int $ga.scaleDownBelow) (int $ga.scaleUpAbove)) -}}
{{- fail "gateway.autoscaling.scaleDownBelow must be lower than scaleUpAbove" -}}
{{- end -}}
{{- if and $ga.enabled (gt (int $ga.minReplicas) (int $ga.maxReplicas)) -}}
{{- fail "gateway.autoscaling.minReplicas must not exceed maxReplicas" -}}
{{- end -}}
{{- range $kind := list "cpu" "gpu" -}}
{{- $w := index $.Values.workers $kind -}}
{{- if $w.enabled -}}
{{- if gt (int $w.minReplicas) (int $w.maxReplicas) -}}
{{- fail (printf "workers.%s.minReplicas must not exceed maxReplicas" $kind) -}}
{{- end -}}
{{- range $w.processing -}}
{{- if not (has . $.Values.topology.processingTypes) -}}
{{- fail (printf "workers.%s.processing: %q is not in topology.processingTypes" $kind .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not (or .Values.workers.cpu.enabled .Values.workers.gpu.enabled) -}}
{{- fail "enable at least one of workers.cpu and workers.gpu" -}}
{{- end -}}
{{- if and (eq .Values.rabbitmq.mode "external") (not (or .Values.rabbitmq.external.url .Values.rabbitmq.external.existingSecret)) -}}
{{- fail "rabbitmq.mode=external needs rabbitmq.external.url or rabbitmq.external.existingSecret" -}}
{{- end -}}
{{- if and (not .Values.gateway.tls.enabled) (not .Values.gateway.tls.insecure) -}}
{{- fail "gateway.tls.enabled=false serves plain ws://: say so with gateway.tls.insecure=true (and terminate TLS in front of the gateways)" -}}
{{- end -}}
{{- end -}}

{{/* --- security ------------------------------------------------------------------------ */}}

{{- define "audiostream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "audiostream.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* The gateway's kubernetes.io/tls Secret: given, or made by cert-manager. */}}
{{- define "audiostream.gatewayTlsSecret" -}}
{{- .Values.gateway.tls.secretName | default (printf "%s-gateway-tls" (include "audiostream.fullname" .)) -}}
{{- end -}}

{{/* Egress rules shared by gateway and worker pods: DNS, the broker's ports, extras. */}}
{{- define "audiostream.egress" -}}
- ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
- ports:
    {{- range .brokerPorts }}
    - {port: {{ . }}, protocol: TCP}
    {{- end }}
{{- with .extraEgress }}
{{ toYaml . }}
{{- end }}
{{- end -}}
