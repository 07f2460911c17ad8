# The Sluice agent image (README: "Run on kind").
#   docker build -t sluice:dev .
#
# Builder: the stable toolchain the workspace pins (rust-version 1.95), pinned by digest, with
# what `cargo xtask setup` installs for the build (agent/tests/deploy.rs keeps them equal):
# a nightly built on LLVM 22 with rust-src (installed as "nightly", the name agent/build.rs
# asks for) and bpf-linker 0.10.2 for the eBPF programs; the musl target and musl-tools for
# a statically linked agent.
FROM docker.io/library/rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS builder
ARG NIGHTLY=nightly-2026-05-19
ARG BPF_LINKER_VERSION=0.10.2
ARG TARGET=x86_64-unknown-linux-musl
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "$TARGET" \
 && rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src \
 && ln -s "$RUSTUP_HOME/toolchains/$NIGHTLY-x86_64-unknown-linux-gnu" \
          "$RUSTUP_HOME/toolchains/nightly-x86_64-unknown-linux-gnu" \
 && cargo install "bpf-linker@$BPF_LINKER_VERSION" --locked
WORKDIR /src
COPY . .
# `cargo xtask image` runs this same build and then the binary in an empty root.
RUN cargo build --release --locked -p sluice --target "$TARGET" \
 && install -D "target/$TARGET/release/sluice" /out/sluice

# Runtime: the static binary and nothing else (it mounts bpffs itself: `sluice mount-bpffs`).
FROM scratch
COPY --from=builder /out/sluice /usr/local/bin/sluice
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["agent"]
