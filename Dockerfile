# The Portcullis operator image: one static (musl) binary on an empty base, non-root.
#
# Nothing is compiled in here and nothing is pulled: `make image` (hack/image.sh) builds the
# binary for each architecture and lays out a root filesystem per architecture in the build
# context, `rootfs-<arch>/`:
#
#   /portcullis                          the operator and CLI, statically linked
#   /etc/ssl/certs/ca-certificates.crt   the CA bundle (Vault over TLS, the API server)
#   /etc/passwd, /etc/group              one user and group, nonroot (65532)
#
# There is no shell, no package manager and no libc in the image. Build it with podman or
# buildah (`make image`) or with `docker buildx build --platform linux/amd64,linux/arm64` on a
# context holding rootfs-amd64/ and rootfs-arm64/ (.github/workflows/release.yml does that).
FROM scratch
ARG TARGETARCH
ARG VERSION=dev
COPY rootfs-${TARGETARCH}/ /
LABEL org.opencontainers.image.title="portcullis" \
      org.opencontainers.image.description="Least privilege for the stages of AI pipelines on Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
# nonroot, as a number: runAsNonRoot can check it without looking the name up.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/portcullis"]
CMD ["--help"]
