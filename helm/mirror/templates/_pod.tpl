{{/*
The pod template, shared by the StatefulSet (one cache per replica, or shared storage) and the
cluster's Deployment (cluster.enabled), which adds the peer endpoint, the cluster secret, a
preStop pause, spread across nodes and a disposable local disk.
*/}}
{{- define "mirror.podTemplate" -}}
{{- $credentials := include "mirror.credentialSources" . -}}
{{- $indexPassword := and .Values.index.postgres.enabled .Values.index.postgres.existingSecret -}}
{{- $cluster := .Values.cluster.enabled -}}
{{- $s3Keys := and .Values.storage.s3.enabled .Values.storage.s3.existingSecret -}}
metadata:
  labels:
    {{- include "mirror.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # A changed config or password restarts the pod.
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    checksum/credentials: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "mirror.serviceAccountName" . }}
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: mirror
      image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - --config
        - /etc/mirror/mirror.toml
        - --log-level
        - {{ .Values.config.logLevel }}
        - --log-format
        - {{ .Values.config.logFormat }}
      {{- if or $s3Keys $cluster }}
      env:
        {{- if $s3Keys }}
        {{- with .Values.storage.s3 }}
        # The AWS client's standard chain reads the keys here: a Secret's two keys do not make
        # the INI file s3_credentials_file wants. The spec holds references, not the keys.
        - name: AWS_ACCESS_KEY_ID
          valueFrom:
            secretKeyRef:
              name: {{ .existingSecret }}
              key: {{ .accessKeyIdKey }}
        - name: AWS_SECRET_ACCESS_KEY
          valueFrom:
            secretKeyRef:
              name: {{ .existingSecret }}
              key: {{ .secretAccessKeyKey }}
        {{- end }}
        {{- end }}
        {{- if $cluster }}
        # Cluster mode: other replicas stream this one's downloads from the peer port, at the
        # address its claims record, the pod's IP (POD_IP must come first: $(POD_IP) expands
        # only variables defined above it).
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: MIRROR_PEER_LISTEN
          value: "0.0.0.0:{{ .Values.cluster.peerPort }}"
        - name: MIRROR_PEER_URL
          value: "http://$(POD_IP):{{ .Values.cluster.peerPort }}"
        - name: MIRROR_CLUSTER_SECRET_FILE
          value: /etc/mirror/cluster/secret
        {{- end }}
      {{- end }}
      ports:
        - name: registry
          containerPort: {{ .Values.service.port }}
          protocol: TCP
        {{- if $cluster }}
        - name: peer
          containerPort: {{ .Values.cluster.peerPort }}
          protocol: TCP
        {{- end }}
      {{- if $cluster }}
      lifecycle:
        # Keep serving while the Service's endpoints forget this pod: on SIGTERM the mirror
        # closes its listener at once (then drains what is in flight), so a connection routed
        # here in between would be refused.
        preStop:
          exec:
            command: ["sleep", "{{ .Values.cluster.preStopSleepSeconds }}"]
      {{- end }}
      startupProbe:  # start-up re-checks the cache (longer for a large one)
        httpGet:
          path: /healthz
          port: registry
          scheme: {{ include "mirror.scheme" . }}
        periodSeconds: 5
        failureThreshold: 120
      livenessProbe:
        httpGet:
          path: /healthz
          port: registry
          scheme: {{ include "mirror.scheme" . }}
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 6
      readinessProbe:
        httpGet:
          path: /readyz
          port: registry
          scheme: {{ include "mirror.scheme" . }}
        periodSeconds: 5
        timeoutSeconds: 3
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: data
          mountPath: /var/lib/mirror
        - name: config
          mountPath: /etc/mirror/mirror.toml
          subPath: mirror.toml
          readOnly: true
        - name: tmp
          mountPath: /tmp
        {{- if $credentials }}
        - name: credentials
          mountPath: /etc/mirror/credentials
          readOnly: true
        {{- end }}
        {{- if .Values.tls.enabled }}
        - name: tls
          mountPath: /etc/mirror/tls
          readOnly: true
        {{- end }}
        {{- if $indexPassword }}
        - name: index-password
          mountPath: /etc/mirror/index
          readOnly: true
        {{- end }}
        {{- if .Values.auth.existingSecret }}
        - name: auth
          mountPath: /etc/mirror/auth
          readOnly: true
        {{- end }}
        {{- if $cluster }}
        - name: cluster-secret
          mountPath: /etc/mirror/cluster
          readOnly: true
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "mirror.fullname" . }}
    - name: tmp
      emptyDir:
        sizeLimit: 64Mi
    {{- if $credentials }}
    - name: credentials
      projected:
        defaultMode: 0440
        sources:
          {{- $credentials | nindent 10 }}
    {{- end }}
    {{- if .Values.tls.enabled }}
    - name: tls
      secret:
        secretName: {{ required "tls.secretName is required with tls.enabled" .Values.tls.secretName }}
        defaultMode: 0440
    {{- end }}
    {{- if $indexPassword }}
    - name: index-password
      secret:
        secretName: {{ .Values.index.postgres.existingSecret }}
        defaultMode: 0440
        items:
          - key: {{ .Values.index.postgres.passwordKey }}
            path: password
    {{- end }}
    {{- with .Values.auth.existingSecret }}
    # The users of the mirror itself (auth_htpasswd): read at start, so a changed Secret takes
    # effect at the next restart.
    - name: auth
      secret:
        secretName: {{ . }}
        defaultMode: 0440
        items:
          - key: {{ $.Values.auth.htpasswdKey }}
            path: htpasswd
    {{- end }}
    {{- if $cluster }}
    - name: cluster-secret
      secret:
        secretName: {{ required "cluster.existingSecret is required with cluster.enabled" .Values.cluster.existingSecret }}
        defaultMode: 0440
        items:
          - key: {{ .Values.cluster.secretKey }}
            path: secret
    {{- with .Values.cluster.localDisk }}
    # Staging and the hot tier only: the cache itself is the bucket and the database, so the
    # disk goes with the pod (a new one refills its hot tier from the bucket, not upstream).
    - name: data
      {{- if eq .type "ephemeral" }}
      ephemeral:
        volumeClaimTemplate:
          metadata:
            labels:
              {{- include "mirror.selectorLabels" $ | nindent 14 }}
          spec:
            accessModes: [ReadWriteOnce]
            {{- with .storageClass }}
            storageClassName: {{ . | quote }}
            {{- end }}
            resources:
              requests:
                storage: {{ .size }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ .size }}
      {{- end }}
    {{- end }}
    {{- else if not .Values.persistence.enabled }}
    - name: data
      emptyDir: {}
    {{- end }}
  {{- if $cluster }}
  topologySpreadConstraints:
    # One replica per node first: a node lost takes one replica, and each replica brings its
    # node's disk and network to the cluster.
    - maxSkew: {{ .Values.cluster.topologySpread.maxSkew }}
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: {{ .Values.cluster.topologySpread.whenUnsatisfiable }}
      labelSelector:
        matchLabels:
          {{- include "mirror.selectorLabels" . | nindent 10 }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
