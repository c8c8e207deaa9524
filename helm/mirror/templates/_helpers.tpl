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

{{/* A TOML array of strings. */}}
{{- define "mirror.tomlStrings" -}}
[{{ range $i, $s := . }}{{ if $i }}, {{ end }}{{ $s | quote }}{{ end }}]
{{- end -}}

{{/*
Values the schema cannot judge alone and the mirror would refuse at start (config.py): fail the
render with the reason rather than deploy a pod that crash-loops.
*/}}
{{- define "mirror.refuseWhatTheMirrorRefuses" -}}
{{- $auth := .Values.auth.existingSecret -}}
{{- if and .Values.hosted (not $auth) -}}
{{- fail (printf "hosted (%s): hosted namespaces need auth.existingSecret, an htpasswd Secret: pushing always needs a mirror user" (keys .Values.hosted | sortAlpha | first)) -}}
{{- end -}}
{{- if and .Values.hosted (not .Values.cluster.enabled) (gt (int .Values.replicaCount) 1) (not (and .Values.storage.s3.enabled .Values.index.postgres.enabled)) -}}
{{- fail "hosted with replicaCount > 1: each replica would keep its own pushes; enable storage.s3 and index.postgres (one shared store)" -}}
{{- end -}}
{{- range $name, $r := (include "mirror.registries" . | fromYaml) -}}
{{- $where := ternary "upstream" (printf "registries.%s" $name) (eq $name "docker.io") -}}
{{- if eq (toString $r.private) "members" -}}
{{- if not $auth -}}
{{- fail (printf "%s.private=members: members are the mirror's users: set auth.existingSecret (an htpasswd Secret)" $where) -}}
{{- end -}}
{{- if not (and $r.username (or $r.password $r.existingSecret)) -}}
{{- fail (printf "%s.private=members: needs the registry's credentials (username, and password or existingSecret): without them, all the mirror fetches is public anyway" $where) -}}
{{- end -}}
{{- end -}}
{{- if and $auth (eq (toString $r.private) "passthrough") -}}
{{- fail (printf "%s.private=passthrough cannot be combined with auth.existingSecret: a client sends one set of credentials, the mirror's or the upstream's" $where) -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $r.members -}}
{{- if hasKey $seen .repository -}}
{{- fail (printf "%s.members: %s is listed twice" $where .repository) -}}
{{- end -}}
{{- $_ := set $seen .repository true -}}
{{- end -}}
{{- end -}}
{{- end -}}
