{{/* Names and labels shared by the templates. */}}

{{- define "pbt-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pbt-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pbt-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pbt-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pbt-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "pbt-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "pbt-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pbt-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* kopf peering is used only when several replicas run. */}}
{{- define "pbt-operator.peering" -}}
{{- if gt (int .Values.replicaCount) 1 -}}true{{- end -}}
{{- end -}}

{{- define "pbt-operator.peeringName" -}}
{{- default (include "pbt-operator.fullname" .) .Values.peering.name -}}
{{- end -}}

{{/*
The rules the operator needs in every namespace it watches (see operator/pbt_operator/kube/api.py and
handlers.py). Only the verbs it uses: no Secrets (workers read storage credentials, the operator never
does), no wildcards, and one delete: segment Jobs (owner references and the garbage collector clean up
everything else).
*/}}
{{- define "pbt-operator.namespacedRules" -}}
# PopulationTrainings: kopf lists/watches them and patches finalizers and annotations (its progress
# storage); the reconcile pass reads one with get and writes its status.
- apiGroups: ["pbt.dev"]
  resources: ["populationtrainings"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["pbt.dev"]
  resources: ["populationtrainings/status"]
  verbs: ["patch"]
# PopulationMembers: listed and watched (the passes read them from a watch-fed cache, kube/membercache.py),
# created and patched (spec.segment, then status history) by the reconcile pass; get when a create meets
# an existing name (is it ours, by owner UID, or a previous training's?).
- apiGroups: ["pbt.dev"]
  resources: ["populationmembers"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["pbt.dev"]
  resources: ["populationmembers/status"]
  verbs: ["patch"]
# Members and Jobs carry ownerReferences with blockOwnerDeletion; clusters that enable the
# OwnerReferencesPermissionEnforcement admission plugin require update on the owner's finalizers.
- apiGroups: ["pbt.dev"]
  resources: ["populationtrainings/finalizers", "populationmembers/finalizers"]
  verbs: ["update"]
# Segment Jobs: created (create-if-absent; get checks the owner of one that exists), listed, and watched
# to wake the training's reconcile. A new training's first Job is also created as a server-side dry run.
# Patched to move the deadline to the trainer's start (activeDeadlineSeconds); deleted to stop a
# segment when its training finishes, is suspended or scaled down (only Jobs of its own members, named
# by uid precondition: kube/reconcile.py; the admission policy in jobpolicy.yaml enforces it).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Segment pods: read for termination messages and disruption conditions, watched for wake-ups. create
# is for one server-side dry run (dryRun=All, nothing is stored) per new training, which asks quota,
# LimitRange, Pod Security and webhooks about its pods at once; creating Jobs already runs pods.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create"]
# Events (Exploited, Explored, SegmentFailed, ...) posted by kopf (core v1 events); listed by reason
# (FailedCreate, Nominated, TriggeredScaleUp) only to say why a segment waits.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
{{- end -}}

{{/*
The operator's start-up check that the installed CRDs are this chart's (kube/crdcheck.py): get of these two
CRDs only. Without it the check is skipped, with a log line.
*/}}
{{- define "pbt-operator.crdReadRule" -}}
# The start-up check that the installed CRDs are this version's (`helm upgrade` never updates them).
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  resourceNames: ["populationtrainings.pbt.dev", "populationmembers.pbt.dev"]
  verbs: ["get"]
{{- end }}
