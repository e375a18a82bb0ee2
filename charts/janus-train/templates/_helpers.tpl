{{/* Namespace of every object: the spec's cluster.namespace, else the release namespace. */}}
{{- define "janus-train.namespace" -}}
{{- .Values.cluster.namespace | default .Release.Namespace -}}
{{- end }}

{{/*
Every value the templates read. Helm deletes a key that the user's file sets to null (and the schema
then never sees it); values.schema.json requires these, and this check names the field again where a
schema is skipped (helm --skip-schema-validation), so that nothing renders as 0 or "" in its place.
*/}}
{{- define "janus-train.requireValues" -}}
{{- range $path := list
    "name"
    "image.repository" "image.tag" "image.pull_policy" "image.pull_secrets"
    "features.mode" "features.credentials_from" "features.cache_dir" "features.cache_size_gib"
    "precompute.pods" "precompute.gpus_per_pod" "precompute.backoff_limit_per_index"
    "training.nodes" "training.gpus_per_node" "training.suspend"
    "training.resize.policy" "training.resize.max_restarts"
    "cluster.service_account" "cluster.node_selector" "cluster.tolerations" "cluster.affinity"
    "cluster.gang_scheduler" "cluster.resources.cpu" "cluster.resources.memory"
    "cluster.resources.gpu_resource_name" "cluster.shm_size" "network.preset" "cluster.rdma_resources"
    "cluster.pod_annotations" "cluster.pod_labels" "cluster.env" "cluster.volumes" "cluster.resource_claims"
    "cluster.restart_policy"
    "cluster.backoff_limit_per_node" "cluster.termination_grace_seconds" "cluster.clean_pod_policy"
    "cluster.checkpoint_staging_gib" "cluster.checkpoint_staging_dir"
    "monitor.enabled" "monitor.interval_seconds" "monitor.imbalance_warning_ratio" "monitor.stale_after_seconds"
    "monitor.port" "monitor.pod_monitor" "monitor.dashboard" }}
{{- $value := $.Values }}
{{- $missing := false }}
{{- range $key := splitList "." $path }}
{{- if and (not $missing) (kindIs "map" $value) (hasKey $value $key) }}
{{- $value = index $value $key }}
{{- else }}
{{- $missing = true }}
{{- end }}
{{- end }}
{{- if or $missing (kindIs "invalid" $value) }}
{{- required (printf "%s: null or missing (Helm drops a key set to null); fix: remove the line to take the chart default, or set a value (janus-job schema describes it)" $path) nil }}
{{- end }}
{{- end }}
{{- end }}

{{/* Recommended labels (app.kubernetes.io/*) shared by every object. */}}
{{- define "janus-train.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/name: {{ .Chart.Name | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/part-of: janus-train
janus-train.io/job: {{ .Values.name | quote }}
{{- end }}

{{- define "janus-train.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
janus-train.io/job: {{ .Values.name | quote }}
{{- end }}

{{/* Labels of the training pods: what the NetworkPolicy and the PodDisruptionBudget select. */}}
{{- define "janus-train.trainerSelector" -}}
{{ include "janus-train.selectorLabels" . }}
app.kubernetes.io/component: trainer
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

{{/* Pod-level settings shared by the precompute, training and validation pods (Pod Security: restricted). */}}
{{- define "janus-train.podSpecCommon" -}}
serviceAccountName: {{ .Values.cluster.service_account | quote }}
automountServiceAccountToken: false
{{- with .Values.image.pull_secrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . | quote }}
{{- end }}
{{- end }}
{{- with .Values.cluster.priority_class }}
priorityClassName: {{ . | quote }}
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

{{/* Pod-level settings of the GPU pods (training and precompute) only: scheduler and runtime class. */}}
{{- define "janus-train.gpuPodSpec" -}}
{{- with .Values.cluster.scheduler_name }}
schedulerName: {{ . | quote }}
{{- end }}
{{- with .Values.cluster.runtime_class_name }}
runtimeClassName: {{ . | quote }}
{{- end }}
{{- end }}

{{/* Labels of a GPU pod: cluster.pod_labels, then the chart's (argument: (list $ chartLabelsYaml)); the
chart's win, so the selectors of the PDB, the NetworkPolicy and the operator stay its own. */}}
{{- define "janus-train.podLabels" -}}
{{- $ := index . 0 -}}
{{- $labels := merge (fromYaml (index . 1)) (deepCopy $.Values.cluster.pod_labels) -}}
{{- toYaml $labels -}}
{{- end }}

{{/* cluster.env of the GPU containers, ahead of the chart's variables (a later entry of one name wins). */}}
{{- define "janus-train.extraEnv" -}}
{{- range .Values.cluster.env }}
- name: {{ .name | quote }}
  value: {{ .value | default "" | quote }}
{{- end }}
{{- end }}

{{/* "true" when the dir lies on a cluster.volumes mount (argument: (list $ dir)). */}}
{{- define "janus-train.onClusterVolume" -}}
{{- $dir := index . 1 -}}
{{- range (index . 0).Values.cluster.volumes -}}
{{- if or (eq $dir .mount_path) (hasPrefix (printf "%s/" .mount_path) $dir) }}true{{ end -}}
{{- end -}}
{{- end }}

{{/* "true" when the chart gives the feature cache a volume of its own (an emptyDir on the node's disk):
a cache size and a cache_dir on no cluster.volumes mount. */}}
{{- define "janus-train.cacheVolume" -}}
{{- if and (gt (float64 .Values.features.cache_size_gib) 0.0) (not (include "janus-train.onClusterVolume" (list . .Values.features.cache_dir))) }}true{{ end -}}
{{- end }}

{{/* "true" when the chart gives checkpoint staging a volume of its own: cluster.checkpoint_staging_dir on no
cluster.volumes mount. */}}
{{- define "janus-train.stagingVolume" -}}
{{- if not (include "janus-train.onClusterVolume" (list . .Values.cluster.checkpoint_staging_dir)) }}true{{ end -}}
{{- end }}

{{/* Container security of every container (Pod Security: restricted; no capability is added). */}}
{{- define "janus-train.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* Environment shared by GPU containers: spec path, writable paths, object-store endpoint, pod identity. */}}
{{- define "janus-train.env" -}}
- name: JANUS_SPEC
  value: /etc/janus/job.yaml
- name: HOME
  value: /home/janus
- name: TMPDIR
  value: /tmp
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

{{/* Credentials, only ever from named Secrets: the object store's for every pod, the experiment trackers'
(training.tracker_secret) for training pods only. Called with (list $ trainer). */}}
{{- define "janus-train.envFrom" -}}
{{- $ := index . 0 -}}
{{- $store := and (eq $.Values.features.credentials_from "secret") $.Values.features.credentials_secret -}}
{{- $trackers := and (index . 1) $.Values.training.tracker_secret -}}
{{- if or $store $trackers }}
envFrom:
{{- if $store }}
  - secretRef:
      name: {{ $.Values.features.credentials_secret | quote }}
{{- end }}
{{- if $trackers }}
  - secretRef:
      name: {{ $.Values.training.tracker_secret | quote }}
{{- end }}
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

{{/* Sizes in GiB of the node-disk emptyDirs of a GPU pod (the ephemeral-storage request adds them up). */}}
{{- define "janus-train.tmpGiB" -}}16{{- end }}
{{- define "janus-train.homeGiB" -}}64{{- end }}
{{- define "janus-train.cacheGiB" -}}{{ int (ceil .Values.features.cache_size_gib) }}{{- end }}
{{- define "janus-train.stagingGiB" -}}{{ int (ceil .Values.cluster.checkpoint_staging_gib) }}{{- end }}

{{/*
Requests = limits of one GPU pod's main container (Guaranteed QoS); argument: (list $ gpuCount trainer).
ephemeral-storage is requested for the emptyDirs on the node's disk, so the scheduler places the pod
where they fit and the kubelet does not evict it under disk pressure.
*/}}
{{- define "janus-train.gpuResources" -}}
{{- $ := index . 0 -}}
{{- $gpus := index . 1 -}}
{{- $trainer := index . 2 -}}
{{- $c := $.Values.cluster -}}
{{- $r := dict $c.resources.gpu_resource_name $gpus "cpu" $c.resources.cpu "memory" $c.resources.memory -}}
{{- if and $trainer (ne $.Values.network.preset "tcp") }}
{{- range $c.rdma_resources }}{{- $_ := set $r .name (int (.count | default 1)) -}}{{- end }}
{{- end }}
{{- $disk := add (include "janus-train.tmpGiB" $) (include "janus-train.homeGiB" $) -}}
{{- if include "janus-train.cacheVolume" $ }}{{- $disk = add $disk (include "janus-train.cacheGiB" $) -}}{{- end }}
{{- if and $trainer (not $c.checkpoint_staging_storage_class) (include "janus-train.stagingVolume" $) }}{{- $disk = add $disk (include "janus-train.stagingGiB" $) -}}{{- end }}
requests:
{{- toYaml $r | nindent 2 }}
  ephemeral-storage: {{ printf "%dGi" $disk | quote }}
limits:
{{- toYaml $r | nindent 2 }}
{{- if and $trainer $c.resource_claims }}
claims:
{{- range $c.resource_claims }}
  - name: {{ .name | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Volumes of every GPU pod: the spec, /dev/shm, /tmp, HOME (model and compiler caches), the feature cache. */}}
{{- define "janus-train.volumes" -}}
- name: spec
  configMap:
    name: {{ printf "%s-spec" .Values.name | quote }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.cluster.shm_size | quote }}
- name: tmp
  emptyDir:
    sizeLimit: {{ printf "%sGi" (include "janus-train.tmpGiB" .) | quote }}
- name: home
  emptyDir:
    sizeLimit: {{ printf "%sGi" (include "janus-train.homeGiB" .) | quote }}
{{- if include "janus-train.cacheVolume" . }}
- name: feature-cache
  emptyDir:
    sizeLimit: {{ printf "%sGi" (include "janus-train.cacheGiB" .) | quote }}
{{- end }}
{{- range .Values.cluster.volumes }}
- name: {{ .name | quote }}
{{- if .pvc }}
  persistentVolumeClaim:
    claimName: {{ .pvc.claim_name | quote }}
    readOnly: {{ .read_only | default false }}
{{- else if .nfs }}
  nfs:
    server: {{ .nfs.server | quote }}
    path: {{ .nfs.path | quote }}
    readOnly: {{ .read_only | default false }}
{{- else if .host_path }}
  hostPath:
    path: {{ .host_path.path | quote }}
    type: {{ .host_path.type | default "Directory" | quote }}
{{- end }}
{{- end }}
{{- end }}

{{- define "janus-train.volumeMounts" -}}
- name: spec
  mountPath: /etc/janus
  readOnly: true
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/janus
{{- if include "janus-train.cacheVolume" . }}
- name: feature-cache
  mountPath: {{ .Values.features.cache_dir | quote }}
{{- end }}
{{- range .Values.cluster.volumes }}
- name: {{ .name | quote }}
  mountPath: {{ .mount_path | quote }}
  readOnly: {{ .read_only | default false }}
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

{{/*
"true" when the PyTorchJob is elastic (resize.policy elastic and room for two or more nodes): then every
node is a Worker replica (no Master) and Worker.replicas, the CRD's scale path, is the node count.
*/}}
{{- define "janus-train.elastic" -}}
{{- $t := .Values.training -}}
{{- if and (eq $t.resize.policy "elastic") (ge (int ($t.resize.max_nodes | default $t.nodes)) 2) }}true{{ end -}}
{{- end }}
