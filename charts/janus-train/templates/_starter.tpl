{{/*
The starter (starter-job.yaml) holds training back until the precompute Job has succeeded: with
features.mode precomputed the PyTorchJob is created suspended, and the starter resumes it, or, under
Kueue, hands it to Kueue by adding the queue-name label (Kueue then owns runPolicy.suspend).
*/}}
{{- define "janus-train.starterEnabled" -}}
{{- if eq .Values.features.mode "precomputed" }}true{{ end -}}
{{- end }}

{{/* runPolicy.suspend at creation: held for the starter, for Kueue's admission, or by training.suspend. */}}
{{- define "janus-train.createSuspended" -}}
{{- if or .Values.training.suspend (include "janus-train.starterEnabled" .) .Values.cluster.kueue_queue -}}
true
{{- else -}}
false
{{- end -}}
{{- end }}

{{/*
Kueue's queue-name label, rendered only when nothing holds the job back: Kueue ignores a job without
it (with its default manageJobsWithoutQueueName: false), and a suspended job's label may still be added.
*/}}
{{- define "janus-train.kueueLabel" -}}
{{- if and .Values.cluster.kueue_queue (not .Values.training.suspend) (not (include "janus-train.starterEnabled" .)) -}}
kueue.x-k8s.io/queue-name: {{ .Values.cluster.kueue_queue | quote }}
{{- end -}}
{{- end }}

{{- define "janus-train.starterName" -}}
{{- printf "%s-starter" .Values.name -}}
{{- end }}

{{/*
Names of every training pod the job can have: <name>-master-0 (a fixed job's, or one left by an earlier
revision) and <name>-worker-0 .. the most Workers (nodes - 1 fixed, the most nodes elastic): the starter
may read exactly these, to resume only once the pods of an earlier revision are gone.
*/}}
{{- define "janus-train.trainerPodNames" -}}
{{- $t := .Values.training -}}
{{- $workers := sub (int $t.nodes) 1 -}}
{{- if include "janus-train.elastic" . }}{{ $workers = int ($t.resize.max_nodes | default $t.nodes) }}{{ end -}}
{{- $names := list (printf "%s-master-0" .Values.name) -}}
{{- range $i := until (int $workers) }}{{ $names = append $names (printf "%s-worker-%d" $.Values.name $i) }}{{ end -}}
{{- $names | toJson -}}
{{- end }}
