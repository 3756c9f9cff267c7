{{/* Labels every object of the release carries. */}}
{{- define "kanava.labels" -}}
app.kubernetes.io/part-of: kanava
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* An image reference: include "kanava.image" (list . "kanava-ztunnel") */}}
{{- define "kanava.image" -}}
{{- $root := index . 0 -}}
{{- printf "%s/%s:%s" $root.Values.image.registry (index . 1) (default $root.Chart.AppVersion $root.Values.image.tag) -}}
{{- end }}

{{/* The name ztunnels verify on the control plane's certificate. */}}
{{- define "kanava.controlPlaneName" -}}
kanava-control-plane.{{ .Release.Namespace }}.svc
{{- end }}

{{/* Security context of containers that need no privilege at all. */}}
{{- define "kanava.restricted" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}
