{{/*
Rules between fields, mirrored from janus_job/spec.py (spec_problems, memory_problems) and
janus_job/deepspeed.py (the refusal rules), so that `helm install -f job.yaml` refuses exactly the
files `janus-job validate` refuses. values.schema.json covers the structure; tests/test_chart_parity.py
compares both sides over every bad-spec case and a sweep of generated specs.
*/}}

{{/* Leaves of a dict as lines "dotted.path<TAB>auto|value"; argument: (dict "tree" D "prefix" P). */}}
{{- define "janus-train.leaves" -}}
{{- range $key, $value := .tree }}
{{- $path := ternary $key (printf "%s.%s" $.prefix $key) (eq $.prefix "") }}
{{- if and (kindIs "map" $value) (gt (len $value) 0) }}
{{- include "janus-train.leaves" (dict "tree" $value "prefix" $path) }}
{{- else }}
{{ $path }}	{{ ternary "auto" "value" (and (kindIs "string" $value) (eq $value "auto")) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "janus-train.validate" -}}
{{- $v := .Values -}}
{{- $t := $v.training -}}
{{- $f := $v.features -}}
{{- $ds := $v.deepspeed -}}
{{- $c := $v.cluster -}}
{{- $m := $v.monitor -}}
{{- $problems := list -}}

{{- /* derived numbers, as JobSpec computes them */ -}}
{{- $nodes := int $t.nodes -}}
{{- $gpus := int $t.gpus_per_node -}}
{{- $micro := int $t.micro_batch_size -}}
{{- $world := mul $nodes $gpus -}}
{{- $minNodes := $nodes -}}
{{- $maxNodes := $nodes -}}
{{- if eq $t.resize.policy "elastic" -}}
{{- $minNodes = int ($t.resize.min_nodes | default $nodes) -}}
{{- $maxNodes = int ($t.resize.max_nodes | default $nodes) -}}
{{- end -}}
{{- $elastic := and (eq $t.resize.policy "elastic") (ge $maxNodes 2) -}}
{{- $global := 0 -}}
{{- if hasKey $t "global_batch_size" -}}
{{- $global = int $t.global_batch_size -}}
{{- else -}}
{{- $global = mul $micro (int ($t.gradient_accumulation_steps | default 8)) $world -}}
{{- end -}}

{{- /* name length with the longest generated suffix */ -}}
{{- $suffixes := list (printf "-worker-%d" (max (sub $maxNodes 2) 0)) "-master-0" (printf "-precompute-xxxxxxxx-%d" (sub (int $v.precompute.pods) 1)) "-spec" -}}
{{- $suffix := "" -}}
{{- range $suffixes }}{{- if gt (len .) (len $suffix) }}{{- $suffix = . }}{{- end }}{{- end -}}
{{- if gt (add (len $v.name) (len $suffix)) 63 -}}
{{- $problems = append $problems (printf "name: '%s' is %d characters; generated names such as '%s%s' would exceed 63\n    fix: use a name of at most %d characters" $v.name (len $v.name) $v.name $suffix (sub 63 (len $suffix))) -}}
{{- end -}}

{{- /* credentials inside URLs (scheme://userinfo@host); the value itself is never repeated */ -}}
{{- $urls := dict "model.qwen" $v.model.qwen "model.vggt" $v.model.vggt "data.annotations" $v.data.annotations "data.image_root" $v.data.image_root "features.store" $f.store "features.endpoint_url" ($f.endpoint_url | default "") "training.checkpoint.url" $t.checkpoint.url -}}
{{- range $field := keys $urls | sortAlpha -}}
{{- if regexMatch "^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@" (toString (get $urls $field)) -}}
{{- $problems = append $problems (printf "%s: holds credentials inside the URL (the part before '@'); they would be copied into the ConfigMap, the pods' environment and log lines (not repeated here)\n    fix: remove them from the URL and put them in the Secret named by features.credentials_secret (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, see manifests/s3-credentials-secret.yaml)" $field) -}}
{{- end -}}
{{- end -}}

{{- /* global batch */ -}}
{{- $batchProblem := false -}}
{{- if and (hasKey $t "gradient_accumulation_steps") (hasKey $t "global_batch_size") -}}
{{- $expected := mul $micro (int $t.gradient_accumulation_steps) $world -}}
{{- if ne $expected $global -}}
{{- $batchProblem = true -}}
{{- $problems = append $problems (printf "training.global_batch_size: %d disagrees with micro_batch_size x gradient_accumulation_steps x nodes x gpus_per_node = %d\n    fix: set only one of global_batch_size and gradient_accumulation_steps (the other is derived)" $global $expected) -}}
{{- end -}}
{{- else if and (hasKey $t "global_batch_size") (ne (mod $global (mul $micro $world)) 0) -}}
{{- $batchProblem = true -}}
{{- $problems = append $problems (printf "training.global_batch_size: %d is not a multiple of micro_batch_size x nodes x gpus_per_node = %d\n    fix: use a multiple of %d" $global (mul $micro $world) (mul $micro $world)) -}}
{{- end -}}

{{- /* resize */ -}}
{{- if and (eq $t.resize.policy "fixed") (or (hasKey $t.resize "min_nodes") (hasKey $t.resize "max_nodes")) -}}
{{- $problems = append $problems "training.resize.min_nodes: min_nodes/max_nodes have no effect with policy 'fixed'\n    fix: set training.resize.policy: elastic, or remove min_nodes/max_nodes" -}}
{{- end -}}
{{- if and $elastic (lt $minNodes 2) -}}
{{- $problems = append $problems (printf "%s: an elastic job keeps a Master and at least one Worker (the training operator refuses 0 Worker replicas), so it cannot run on %d node\n    fix: set training.resize.min_nodes (and training.nodes) >= 2, or training.resize.policy: fixed for one node" (ternary "training.resize.min_nodes" "training.nodes" (hasKey $t.resize "min_nodes")) $minNodes) -}}
{{- else if or (lt $nodes $minNodes) (gt $nodes $maxNodes) -}}
{{- $problems = append $problems (printf "training.nodes: %d is outside training.resize [%d, %d]\n    fix: set min_nodes <= nodes <= max_nodes" $nodes $minNodes $maxNodes) -}}
{{- else if not $batchProblem -}}
{{- $done := false -}}
{{- range $n := untilStep (int $minNodes) (int (add $maxNodes 1)) 1 -}}
{{- $perStep := mul $micro $n $gpus -}}
{{- if and (not $done) (ne (mod $global $perStep) 0) -}}
{{- $done = true -}}
{{- $problems = append $problems (printf "training.resize: the global batch %d cannot be kept at %d nodes (not a multiple of micro_batch_size x %d x gpus_per_node = %d)\n    fix: narrow training.resize.min_nodes/max_nodes, or set training.global_batch_size to a common multiple of micro_batch_size x gpus_per_node x every allowed node count" $global $n $n $perStep) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- if and (not (hasKey $t "max_steps")) (gt (float64 $t.warmup_ratio) 0.5) -}}
{{- $problems = append $problems "training.warmup_ratio: leaves most of training in warmup\n    fix: use a value below 0.5 (JanusVLN: 0.03)" -}}
{{- end -}}

{{- /* data */ -}}
{{- if gt (int $v.data.min_pixels) (int $v.data.max_pixels) -}}
{{- $problems = append $problems (printf "data.min_pixels: %d is larger than data.max_pixels %d\n    fix: make min_pixels <= max_pixels (defaults 16*28*28 and 576*28*28)" (int $v.data.min_pixels) (int $v.data.max_pixels)) -}}
{{- end -}}
{{- if and (eq (int $v.data.num_workers) 0) $v.data.persistent_workers -}}
{{- $problems = append $problems "data.persistent_workers: requires data.num_workers > 0\n    fix: set persistent_workers: false or num_workers >= 1" -}}
{{- end -}}

{{- /* feature store */ -}}
{{- $remote := regexMatch "^(s3|s3a|gs|gcs|az|abfs|abfss)://" $f.store -}}
{{- if and $remote (eq $f.credentials_from "secret") (not $f.credentials_secret) -}}
{{- $problems = append $problems (printf "features.credentials_secret: the store %s needs credentials and credentials_from is 'secret', but no Secret is named\n    fix: create the Secret from manifests/s3-credentials-secret.yaml and set features.credentials_secret to its name, or set features.credentials_from: environment" $f.store) -}}
{{- end -}}
{{- if and $f.endpoint_url (not $remote) -}}
{{- $problems = append $problems (printf "features.endpoint_url: set, but the store %s is not an object-store URL\n    fix: remove endpoint_url or use an s3:// store" $f.store) -}}
{{- end -}}
{{- if and $f.endpoint_url (not (regexMatch "^https?://" $f.endpoint_url)) -}}
{{- $problems = append $problems (printf "features.endpoint_url: '%s' is not an http(s) URL\n    fix: write it like https://minio.example:9000" $f.endpoint_url) -}}
{{- end -}}
{{- if and (eq $f.mode "online") $f.cache_vision -}}
{{- $problems = append $problems "features.cache_vision: has no effect in mode 'online'\n    fix: set cache_vision: false or mode: precomputed" -}}
{{- end -}}

{{- /* cluster, monitor */ -}}
{{- if and (eq $c.gang_scheduler "volcano") (not $c.queue) -}}
{{- $problems = append $problems "cluster.queue: gang_scheduler 'volcano' needs a queue\n    fix: set cluster.queue (e.g. default)" -}}
{{- end -}}
{{- if and (ne $c.gang_scheduler "volcano") $c.queue -}}
{{- $problems = append $problems "cluster.queue: queues are a Volcano feature\n    fix: remove cluster.queue or set gang_scheduler: volcano" -}}
{{- end -}}
{{- if and (eq $c.network "tcp") $c.nccl_ib_hca -}}
{{- $problems = append $problems "cluster.nccl_ib_hca: has no effect with network 'tcp'\n    fix: remove it or choose network infiniband/roce" -}}
{{- end -}}
{{- if le (int $m.stale_after_seconds) (int $m.interval_seconds) -}}
{{- $problems = append $problems (printf "monitor.stale_after_seconds: %d s is not longer than monitor.interval_seconds\n    fix: use at least 2 x interval_seconds (%d)" (int $m.stale_after_seconds) (mul 2 (int $m.interval_seconds))) -}}
{{- end -}}

{{- /* does one GPU hold it? (same model sizes and formula as spec.estimate_gpu_memory) */ -}}
{{- $stage := int $ds.zero_stage -}}
{{- $visionTrained := hasKey $t "vision_learning_rate" -}}
{{- $trainable := 7.713e9 -}}
{{- if $visionTrained }}{{- $trainable = addf $trainable 0.63e9 }}{{- end -}}
{{- $params := 7.713e9 -}}
{{- if or (not $f.cache_vision) (eq $f.mode "online") $visionTrained }}{{- $params = addf $params 0.63e9 }}{{- end -}}
{{- if eq $f.mode "online" }}{{- $params = addf $params 1.26e9 }}{{- end -}}
{{- $n := float64 (mul $minNodes $gpus) -}}
{{- $weights := mulf 2 $params -}}
{{- if eq $stage 3 }}{{- $weights = divf $weights $n }}{{- end -}}
{{- if eq $ds.offload_param "cpu" }}{{- $weights = 0.0 }}{{- end -}}
{{- $grads := mulf 2 $trainable -}}
{{- if ge $stage 2 }}{{- $grads = divf $grads $n }}{{- end -}}
{{- $optim := mulf 16 $trainable -}}
{{- if ge $stage 1 }}{{- $optim = divf $optim $n }}{{- end -}}
{{- if eq $ds.offload_optimizer "cpu" }}{{- $optim = 0.0 }}{{- end -}}
{{- $tokensPerSample := add (div (mul (add (int $v.data.max_history_images) 1) (int $v.data.max_pixels)) 784) 512 -}}
{{- $tokens := float64 (mul $tokensPerSample $micro) -}}
{{- $layer := mulf 2 (add (mul 7 3584) (mul 3 18944)) -}}
{{- $acts := 0.0 -}}
{{- if $t.gradient_checkpointing -}}
{{- $acts = mulf $tokens (addf (mulf 28 3584 2) $layer) -}}
{{- else -}}
{{- $acts = mulf $tokens 28 $layer -}}
{{- end -}}
{{- $logits := mulf 64 $micro 152064 10 -}}
{{- $gib := divf (addf $weights $grads $optim $acts $logits) 1073741824.0 | addf 4.0 -}}
{{- $limit := mulf (float64 $c.resources.gpu_memory_gib) 0.95 -}}
{{- if gt $gib $limit -}}
{{- $problems = append $problems (printf "training.micro_batch_size: micro batch %d of up to %d tokens/sample does not fit a %v GiB GPU at %d ranks (estimated %.1f GiB)\n    fix: lower training.micro_batch_size, enable training.gradient_checkpointing, raise deepspeed.zero_stage or offload the optimizer (janus-job validate lists the parts)" $micro $tokensPerSample $c.resources.gpu_memory_gib (mul $minNodes $gpus) $gib) -}}
{{- end -}}

{{- /* DeepSpeed rules (janus_job/deepspeed.py) */ -}}
{{- $owned := dict "train_batch_size" "training.global_batch_size" "train_micro_batch_size_per_gpu" "training.micro_batch_size" "gradient_accumulation_steps" "training.gradient_accumulation_steps / training.global_batch_size" "gradient_clipping" "deepspeed.gradient_clipping" "bf16.enabled" "deepspeed.bf16" "zero_optimization.stage" "deepspeed.zero_stage" "zero_optimization.overlap_comm" "deepspeed.overlap_comm" "zero_optimization.contiguous_gradients" "deepspeed.contiguous_gradients" "zero_optimization.reduce_bucket_size" "deepspeed.reduce_bucket_size" "zero_optimization.allgather_bucket_size" "deepspeed.allgather_bucket_size" "optimizer.params.lr" "training.learning_rate" "optimizer.params.weight_decay" "training.weight_decay" -}}
{{- $extra := $ds.extra_config | default dict -}}
{{- range $line := splitList "\n" (include "janus-train.leaves" (dict "tree" $extra "prefix" "")) -}}
{{- if $line -}}
{{- $parts := splitList "\t" $line -}}
{{- $path := first $parts -}}
{{- if hasKey $owned $path -}}
{{- $problems = append $problems (printf "deepspeed.extra_config.%s: sets a value the spec determines (%s)\n    fix: remove it from extra_config and set %s instead" $path (get $owned $path) (get $owned $path)) -}}
{{- else if eq (last $parts) "auto" -}}
{{- $problems = append $problems (printf "deepspeed.extra_config.%s: is 'auto'; nothing fills it in\n    fix: give a concrete value or remove the key" $path) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $section := list "zero_optimization" "bf16" "fp16" -}}
{{- if and (hasKey $extra $section) (not (kindIs "map" (get $extra $section))) -}}
{{- $problems = append $problems (printf "deepspeed.extra_config.%s: must be a mapping\n    fix: write it as key: value lines, as in DeepSpeed's config" $section) -}}
{{- end -}}
{{- end -}}
{{- $zero := get $extra "zero_optimization" | default dict -}}
{{- if not (kindIs "map" $zero) }}{{- $zero = dict }}{{- end -}}
{{- $mergedStage := $stage -}}
{{- if hasKey $zero "stage" }}{{- $mergedStage = int $zero.stage }}{{- end -}}
{{- $extraParamOffload := and (hasKey $zero "offload_param") (kindIs "map" $zero.offload_param) (not (has (get ($zero.offload_param | default dict) "device" | default "none") (list "none"))) -}}
{{- if and (eq $ds.offload_param "cpu") (lt $stage 3) -}}
{{- $problems = append $problems (printf "deepspeed.offload_param: parameter offload only exists in ZeRO-3; at zero_stage %d DeepSpeed ignores it\n    fix: set deepspeed.offload_param: none, or deepspeed.zero_stage: 3" $stage) -}}
{{- else if and (lt $mergedStage 3) $extraParamOffload -}}
{{- $problems = append $problems (printf "deepspeed.extra_config.zero_optimization.offload_param: parameter offload only exists in ZeRO-3 (zero_stage is %d)\n    fix: remove it, or set deepspeed.zero_stage: 3 and deepspeed.offload_param: cpu" $mergedStage) -}}
{{- end -}}
{{- if hasKey $extra "activation_checkpointing" -}}
{{- $problems = append $problems "deepspeed.extra_config.activation_checkpointing: is ineffective with Hugging Face gradient checkpointing\n    fix: remove the block; training.gradient_checkpointing controls recomputation" -}}
{{- end -}}
{{- $optOffload := eq $ds.offload_optimizer "cpu" -}}
{{- if and (hasKey $zero "offload_optimizer") (kindIs "map" $zero.offload_optimizer) -}}
{{- if hasKey $zero.offload_optimizer "device" }}{{- $optOffload = not (has ($zero.offload_optimizer.device | default "none") (list "none")) }}{{- end -}}
{{- end -}}
{{- if $optOffload -}}
{{- if and (eq $ds.optimizer "torch") (not (hasKey $extra "optimizer")) -}}
{{- $problems = append $problems "deepspeed.offload_optimizer: optimizer offload needs DeepSpeed to build the optimizer (CPU Adam) from an optimizer section\n    fix: set deepspeed.optimizer: deepspeed, or deepspeed.offload_optimizer: none" -}}
{{- end -}}
{{- if eq $mergedStage 0 -}}
{{- $problems = append $problems "deepspeed.offload_optimizer: optimizer offload needs ZeRO stage 1-3 (zero_stage is 0)\n    fix: set deepspeed.zero_stage: 2 (or 1/3), or deepspeed.offload_optimizer: none" -}}
{{- end -}}
{{- end -}}
{{- if lt $mergedStage 3 -}}
{{- range $field := list "prefetch_bucket_size" "param_persistence_threshold" "max_live_parameters" "max_reuse_distance" "gather_16bit_weights_on_model_save" -}}
{{- if hasKey ($ds.stage3 | default dict) $field -}}
{{- $problems = append $problems (printf "deepspeed.stage3.%s: is a ZeRO-3 setting; zero_stage is %d\n    fix: remove it, or set deepspeed.zero_stage: 3" $field $mergedStage) -}}
{{- end -}}
{{- end -}}
{{- range $key := list "mics_shard_size" "stage3_gather_16bit_weights_on_model_save" "stage3_max_live_parameters" "stage3_max_reuse_distance" "stage3_module_granularity_threshold" "stage3_param_persistence_threshold" "stage3_prefetch_bucket_size" "sub_group_size" "zero_hpz_partition_size" "zero_quantized_weights" -}}
{{- if hasKey $zero $key -}}
{{- $problems = append $problems (printf "deepspeed.extra_config.zero_optimization.%s: is a ZeRO-3 setting; zero_stage is %d\n    fix: remove it, or set deepspeed.zero_stage: 3" $key $mergedStage) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $bf16 := $ds.bf16 -}}
{{- $extraBf16 := get $extra "bf16" | default dict -}}
{{- if not (kindIs "map" $extraBf16) }}{{- $extraBf16 = dict }}{{- end -}}
{{- if and (kindIs "map" $extraBf16) (hasKey $extraBf16 "enabled") }}{{- $bf16 = $extraBf16.enabled }}{{- end -}}
{{- $fp16 := get $extra "fp16" | default dict -}}
{{- if and (kindIs "map" $fp16) (eq (toString (get $fp16 "enabled")) "true") (eq (toString $bf16) "true") -}}
{{- $problems = append $problems "deepspeed.extra_config.fp16: fp16 and bf16 cannot both be enabled\n    fix: remove fp16 from extra_config (janus-train trains in bf16)" -}}
{{- end -}}
{{- if hasKey $extra "scheduler" -}}
{{- $problems = append $problems "deepspeed.extra_config.scheduler: the trainer builds the learning-rate schedule\n    fix: remove it and use training.scheduler and training.warmup_ratio" -}}
{{- end -}}

{{- if $problems -}}
{{- fail (printf "\n%d problem(s) in the job spec (janus-job validate prints the same checks):\n  - %s" (len $problems) (join "\n  - " $problems)) -}}
{{- end -}}
{{- end }}
