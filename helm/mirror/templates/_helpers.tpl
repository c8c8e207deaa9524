{{- define "mirror.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mirror.fullname" -}}
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

{{- define "mirror.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mirror.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mirror.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "mirror.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "mirror.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mirror.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Every registry the mirror serves, docker.io first, as name -> settings. */}}
{{- define "mirror.registries" -}}
{{- $all := dict "docker.io" .Values.upstream -}}
{{- range $name, $r := .Values.registries -}}
{{- $_ := set $all $name $r -}}
{{- end -}}
{{- toYaml $all -}}
{{- end -}}

{{/* Projected-volume sources putting each registry's password at credentials/<registry>. */}}
{{- define "mirror.credentialSources" -}}
{{- $secret := printf "%s-credentials" (include "mirror.fullname" .) -}}
{{- range $name, $r := (include "mirror.registries" . | fromYaml) -}}
{{- if $r.existingSecret }}
- secret:
    name: {{ $r.existingSecret }}
    items:
      - key: {{ default "password" $r.existingSecretKey }}
        path: {{ $name }}
{{- else if $r.password }}
- secret:
    name: {{ $secret }}
    items:
      - key: {{ $name }}
        path: {{ $name }}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "mirror.scheme" -}}
{{- if .Values.tls.enabled -}}HTTPS{{- else -}}HTTP{{- end -}}
{{- end -}}
