# syntax=docker/dockerfile:1
# The Portcullis operator image: a static (musl) binary on distroless, running as 65532.
#
#   docker build -t registry.example.com/portcullis:0.1.0 .
#
# Build on the platform you deploy to (or `docker buildx build --platform linux/arm64 ...`): the
# builder compiles for its own architecture. The chart (charts/portcullis) runs the image with a
# read-only root filesystem, no capabilities, seccomp RuntimeDefault, as user 65532.

FROM rust:1-bookworm AS build
# ring (rustls's crypto) has C and assembly parts: musl-gcc compiles them for the musl target.
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eux; \
    target="$(uname -m)-unknown-linux-musl"; \
    rustup target add "$target"; \
    export "CC_$(echo "$target" | tr - _)=musl-gcc"; \
    cargo build --release --locked --bin portcullis --target "$target"; \
    cp "target/$target/release/portcullis" /portcullis; \
    /portcullis --version

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /portcullis /portcullis
# nonroot is 65532:65532; stated here so that runAsNonRoot can check it without a name lookup.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/portcullis"]
CMD ["--help"]
