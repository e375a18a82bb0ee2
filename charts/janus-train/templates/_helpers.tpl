{{/* Namespace of every object: the spec's cluster.namespace, else the release namespace. */}}
{{- define "janus-train.namespace" -}}
{{- .Values.cluster.namespace | default .Release.Namespace -}}
{{- end }}

{{/* Recommended labels (app.kubernetes.io/*) shared by every object. */}}
{{- define "janus-train.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: janus-train
janus-train.io/job: {{ .Values.name }}
{{- end }}

{{- define "janus-train.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
janus-train.io/job: {{ .Values.name }}
{{- end }}

{{/* sha256 of the validated spec: pods restart when it changes. */}}
{{- define "janus-train.specChecksum" -}}
{{- toYaml .Values | sha256sum -}}
{{- end }}

{{- define "janus-train.image" -}}
{{- if hasPrefix "@" .Values.image.tag -}}
{{ .Values.image.repository }}{{ .Values.image.tag }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
{{- end }}

{{/* Pod-level settings shared by the precompute and training pods. */}}
{{- define "janus-train.podSpecCommon" -}}
serviceAccountName: {{ .Values.cluster.service_account }}
automountServiceAccountToken: false
{{- with .Values.image.pull_secrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- with .Values.cluster.priority_class }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.cluster.node_selector }}
nodeSelector:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.cluster.tolerations }}
tolerations:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.cluster.affinity }}
affinity:
{{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  runAsNonRoot: true
  runAsUser: 1000
  runAsGroup: 1000
  fsGroup: 1000
  seccompProfile:
    type: RuntimeDefault
{{- end }}

{{/* Environment shared by GPU containers: spec path, object-store endpoint, pod identity. */}}
{{- define "janus-train.env" -}}
- name: JANUS_SPEC
  value: /etc/janus/job.yaml
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- with .Values.features.endpoint_url }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* Object-store credentials: only ever from the named Secret. */}}
{{- define "janus-train.envFrom" -}}
{{- if and (eq .Values.features.credentials_from "secret") .Values.features.credentials_secret }}
envFrom:
  - secretRef:
      name: {{ .Values.features.credentials_secret }}
{{- end }}
{{- end }}

{{/* Network variables: `janus-job launch` sets NCCL's from the spec's network section
(janus_job/network.py); the pod only adds what the API server knows. */}}
{{- define "janus-train.ncclEnv" -}}
{{- if eq .Values.network.preset "hostnetwork" }}
# torchrun's rendezvous address: the pod IP (the node's IP here), not the node name via /etc/hosts
- name: JANUS_POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}
{{- end }}

{{/* GPU (+ RDMA, CPU, memory) requests = limits of one GPU pod; argument: (list $ gpuCount). */}}
{{- define "janus-train.gpuResources" -}}
{{- $ := index . 0 -}}
{{- $gpus := index . 1 -}}
{{- $c := $.Values.cluster -}}
{{- $r := dict $c.resources.gpu_resource_name $gpus -}}
{{- if ne $.Values.network.preset "tcp" }}{{- $_ := set $r $c.rdma_resource (int $c.rdma_resource_count) -}}{{- end }}
{{- with $c.resources.cpu }}{{- $_ := set $r "cpu" . -}}{{- end }}
{{- with $c.resources.memory }}{{- $_ := set $r "memory" . -}}{{- end }}
requests:
{{- toYaml $r | nindent 2 }}
limits:
{{- toYaml $r | nindent 2 }}
{{- end }}

{{- define "janus-train.gpuContainerSecurity" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
  add: ["IPC_LOCK"]
{{- end }}

{{/* Volumes: the spec, /dev/shm, the feature cache. */}}
{{- define "janus-train.volumes" -}}
- name: spec
  configMap:
    name: {{ .Values.name }}-spec
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.cluster.shm_size }}
{{- if gt (float64 .Values.features.cache_size_gib) 0.0 }}
- name: feature-cache
  emptyDir:
    sizeLimit: {{ printf "%dGi" (int (ceil .Values.features.cache_size_gib)) }}
{{- end }}
{{- end }}

{{- define "janus-train.volumeMounts" -}}
- name: spec
  mountPath: /etc/janus
  readOnly: true
- name: dshm
  mountPath: /dev/shm
{{- if gt (float64 .Values.features.cache_size_gib) 0.0 }}
- name: feature-cache
  mountPath: {{ .Values.features.cache_dir }}
{{- end }}
{{- end }}

{{- define "janus-train.hostNetwork" -}}
{{- if eq .Values.network.preset "hostnetwork" }}
hostNetwork: true
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
{{- end }}

{{/* Name of the precompute Job: <name>-precompute-<hash of its spec and of what precompute reads>. */}}
{{- define "janus-train.precomputeJobName" -}}
{{- $inputs := toYaml (pick .Values "image" "model" "data" "features" "precompute") -}}
{{- $hash := printf "%s\n%s" (include "janus-train.precomputeJobSpec" .) $inputs | sha256sum | trunc 8 -}}
{{- printf "%s-precompute-%s" .Values.name $hash -}}
{{- end }}
