{{- define "vmlet.name" -}}vmlet{{- end -}}

{{- define "vmlet.labels" -}}
app.kubernetes.io/name: vmlet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "vmlet.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "vmlet.controller.selector" -}}
app.kubernetes.io/name: vmlet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "vmlet.agent.selector" -}}
app.kubernetes.io/name: vmlet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end -}}

{{/* Logging for every vmlet container: RUST_LOG's filter and the line format. */}}
{{- define "vmlet.logEnv" -}}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
- name: VMLET_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- end }}
