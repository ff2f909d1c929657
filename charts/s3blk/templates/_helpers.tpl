{{- define "s3blk.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "s3blk.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "s3blk.labels" -}}
app.kubernetes.io/name: {{ include "s3blk.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "s3blk.selector" -}}
app.kubernetes.io/name: {{ include "s3blk.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "s3blk.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "s3blk.sidecar" -}}
{{ .repository }}:{{ .tag }}
{{- end -}}

{{- define "s3blk.secretName" -}}
{{- if .Values.s3.existingSecret -}}
{{ .Values.s3.existingSecret }}
{{- else -}}
{{ include "s3blk.fullname" . }}-s3
{{- end -}}
{{- end -}}

{{/* The StorageClass and VolumeSnapshotClass name a Secret: one holds
     S3 credentials, an encryption key, or both. */}}
{{- define "s3blk.useSecret" -}}
{{- if or .Values.s3.existingSecret .Values.s3.accessKeyID .Values.encryption.key -}}true{{- end -}}
{{- end -}}

{{/* The driver containers take S3 credentials from the Secret. */}}
{{- define "s3blk.secretCredentials" -}}
{{- if or .Values.s3.existingSecret .Values.s3.accessKeyID -}}true{{- end -}}
{{- end -}}

{{/* S3 settings for the driver containers. */}}
{{- define "s3blk.s3env" -}}
- name: S3BLK_LOG
  value: {{ .Values.logLevel | quote }}
- name: AWS_REGION
  value: {{ .Values.s3.region | quote }}
{{- if .Values.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ .Values.s3.endpoint | quote }}
{{- end }}
{{- if .Values.s3.checksums }}
- name: S3BLK_S3_CHECKSUMS
  value: {{ .Values.s3.checksums | quote }}
{{- end }}
{{- if include "s3blk.secretCredentials" . }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "s3blk.secretName" . }}
      key: accessKeyID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "s3blk.secretName" . }}
      key: secretAccessKey
{{- end }}
{{- end -}}
