{{/* Chart name. */}}
{{- define "afnext.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every resource name: "<release>-<chart>" unless the release name contains the chart name. */}}
{{- define "afnext.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels of every resource. */}}
{{- define "afnext.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "afnext.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: afnext
{{- end -}}

{{/* Selector labels of one component: include "afnext.selectorLabels" (dict "ctx" $ "component" "router"). */}}
{{- define "afnext.selectorLabels" -}}
app.kubernetes.io/name: {{ include "afnext.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of one component. */}}
{{- define "afnext.componentLabels" -}}
{{ include "afnext.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The CPU image. */}}
{{- define "afnext.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The CUDA image: the CPU tag plus image.cudaTagSuffix. */}}
{{- define "afnext.imageCuda" -}}
{{- printf "%s:%s%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) .Values.image.cudaTagSuffix -}}
{{- end -}}

{{/* etcd client URLs, comma-separated: the bundled etcd's Service, or etcd.endpoints. */}}
{{- define "afnext.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- printf "http://%s-etcd:%d" (include "afnext.fullname" .) (int .Values.etcd.clientPort) -}}
{{- else if .Values.etcd.endpoints -}}
{{- join "," .Values.etcd.endpoints -}}
{{- else -}}
{{- fail "etcd.enabled is false: set etcd.endpoints to your etcd's client URLs" -}}
{{- end -}}
{{- end -}}

{{/* True (non-empty) when model.id is a directory inside the containers rather than a hub repo id. */}}
{{- define "afnext.modelIsPath" -}}
{{- if or (hasPrefix "/" .Values.model.id) (hasPrefix "." .Values.model.id) -}}true{{- end -}}
{{- end -}}

{{/* Arguments every afnext role takes: model, etcd discovery. One argument per line, YAML list items. */}}
{{- define "afnext.modelArgs" -}}
- --model={{ .Values.model.id }}
{{- if .Values.model.revision }}
- --revision={{ .Values.model.revision }}
{{- end }}
{{- end -}}

{{- define "afnext.etcdArgs" -}}
- --etcd-endpoints={{ include "afnext.etcdEndpoints" . }}
- --cluster-prefix={{ .Values.cluster.prefix }}
{{- end -}}

{{/* TLS arguments of one role: include "afnext.tlsArgs" (dict "ctx" $ "internal" true).
     internal: the listener is an internal one (encoder, decoder), which requires client certificates with
     tls.mutual. Every role presents its certificate when dialing (the default of --tls-client-cert). */}}
{{- define "afnext.tlsArgs" -}}
{{- $v := .ctx.Values -}}
{{- if $v.tls.enabled }}
- --tls-cert=/etc/afnext/tls/tls.crt
- --tls-key=/etc/afnext/tls/tls.key
- --tls-ca=/etc/afnext/tls/ca.crt
{{- if and $v.tls.mutual .internal }}
- --tls-client-ca=/etc/afnext/tls/ca.crt
{{- end }}
{{- if $v.tls.serverName }}
- --tls-server-name={{ $v.tls.serverName }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Fails on values that the schema cannot express. */}}
{{- define "afnext.validate" -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) -}}
{{- fail "tls.enabled needs tls.secretName (a Secret with tls.crt, tls.key and ca.crt)" -}}
{{- end -}}
{{- if and .Values.apiKeys.enabled (not .Values.apiKeys.existingSecret) (not .Values.apiKeys.keys) -}}
{{- fail "apiKeys.enabled needs apiKeys.existingSecret or apiKeys.keys" -}}
{{- end -}}
{{- if and .Values.encoder.autoscaling.enabled (eq (int .Values.encoder.autoscaling.targetCPUUtilizationPercentage) 0) (not .Values.encoder.autoscaling.queueDepth.enabled) -}}
{{- fail "encoder.autoscaling needs targetCPUUtilizationPercentage > 0 or queueDepth.enabled" -}}
{{- end -}}
{{- end -}}

{{/* Name of the Secret holding the API keys. */}}
{{- define "afnext.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "afnext.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{/* Name of the model cache claim. */}}
{{- define "afnext.modelCacheClaim" -}}
{{- default (printf "%s-model-cache" (include "afnext.fullname" .)) .Values.modelCache.existingClaim -}}
{{- end -}}

{{/* Environment of every afnext container: the pod IP (for --advertise), the ConfigMap, the HF token. */}}
{{- define "afnext.env" -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- if .Values.model.hfTokenSecret.name }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.model.hfTokenSecret.name }}
      key: {{ .Values.model.hfTokenSecret.key }}
{{- end }}
{{- end -}}

{{- define "afnext.envFrom" -}}
- configMapRef:
    name: {{ include "afnext.fullname" . }}-env
{{- end -}}

{{/* Pod annotations: config checksums (restart on change) and the Prometheus scrape hints. */}}
{{- define "afnext.podAnnotations" -}}
{{- $ctx := .ctx -}}
checksum/config: {{ include (print $ctx.Template.BasePath "/configmap.yaml") $ctx | sha256sum }}
{{- if and $ctx.Values.apiKeys.enabled (eq .component "router") }}
checksum/api-keys: {{ include (print $ctx.Template.BasePath "/secret.yaml") $ctx | sha256sum }}
{{- end }}
{{- if $ctx.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ $ctx.Values.metrics.port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes of every afnext pod: the model cache, the TLS secret. */}}
{{- define "afnext.volumes" -}}
- name: model-cache
{{- if .Values.modelCache.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "afnext.modelCacheClaim" . }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: tmp
  emptyDir: {}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "afnext.volumeMounts" -}}
- name: model-cache
  mountPath: {{ .Values.modelCache.mountPath }}
- name: tmp
  mountPath: /tmp
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/afnext/tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* The prefetch init container (see values.yaml model.prefetch). */}}
{{- define "afnext.prefetchInit" -}}
{{- if and .Values.model.prefetch.enabled (not .Values.model.hubOffline) (not (include "afnext.modelIsPath" .)) }}
- name: prefetch-model
  image: {{ .Values.model.prefetch.image }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - sh
    - -c
    - |
      set -e
      pip install --quiet --disable-pip-version-check --no-cache-dir --target /tmp/pylib "huggingface_hub=={{ .Values.model.prefetch.huggingfaceHubVersion }}"
      PYTHONPATH=/tmp/pylib python3 - <<'PY'
      import json, os
      from huggingface_hub import snapshot_download
      path = snapshot_download(
          os.environ["AFNEXT_MODEL"],
          revision=os.environ.get("AFNEXT_REVISION") or None,
          cache_dir=os.path.join(os.environ["HF_HOME"], "hub"),
          allow_patterns=json.loads(os.environ["AFNEXT_ALLOW_PATTERNS"]),
      )
      print("model in", path, flush=True)
      PY
  env:
    - name: HOME
      value: /tmp
    - name: AFNEXT_MODEL
      value: {{ .Values.model.id | quote }}
    - name: AFNEXT_REVISION
      value: {{ .Values.model.revision | quote }}
    - name: AFNEXT_ALLOW_PATTERNS
      value: {{ toJson .Values.model.prefetch.allowPatterns | quote }}
    {{- include "afnext.env" . | nindent 4 }}
  envFrom:
    {{- include "afnext.envFrom" . | nindent 4 }}
  resources:
    {{- toYaml .Values.model.prefetch.resources | nindent 4 }}
  securityContext:
    allowPrivilegeEscalation: false
  volumeMounts:
    - name: model-cache
      mountPath: {{ .Values.modelCache.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end -}}

{{/* HTTP probes on the metrics port. */}}
{{- define "afnext.probes" -}}
{{- $p := .Values.probes -}}
startupProbe:
  httpGet:
    path: /live
    port: metrics
  periodSeconds: {{ $p.startup.periodSeconds }}
  failureThreshold: {{ $p.startup.failureThreshold }}
  timeoutSeconds: {{ $p.startup.timeoutSeconds }}
livenessProbe:
  httpGet:
    path: /live
    port: metrics
  periodSeconds: {{ $p.liveness.periodSeconds }}
  failureThreshold: {{ $p.liveness.failureThreshold }}
  timeoutSeconds: {{ $p.liveness.timeoutSeconds }}
readinessProbe:
  httpGet:
    path: /ready
    port: metrics
  periodSeconds: {{ $p.readiness.periodSeconds }}
  failureThreshold: {{ $p.readiness.failureThreshold }}
  timeoutSeconds: {{ $p.readiness.timeoutSeconds }}
{{- end -}}

{{/* Container security context of the afnext containers. */}}
{{- define "afnext.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Resources with the GPU count merged in: include "afnext.resources" (dict "resources" R "gpus" N). */}}
{{- define "afnext.resources" -}}
{{- $r := deepCopy .resources -}}
{{- if gt (int .gpus) 0 -}}
{{- $limits := default (dict) $r.limits -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $r "limits" $limits -}}
{{- $requests := default (dict) $r.requests -}}
{{- $_ := set $requests "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $r "requests" $requests -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}

{{/* Common pod spec fields. */}}
{{- define "afnext.podCommon" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}
