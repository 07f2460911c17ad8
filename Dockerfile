# The Sluice agent image (README: "Run on kind").
#   docker build -t sluice:dev .
#
# Builder: the stable toolchain the workspace pins (rust-version 1.95) for the agent, and the
# eBPF toolchain `cargo xtask setup` checks for: a nightly built on LLVM 22 with rust-src
# (installed as "nightly", the name agent/build.rs asks for) and bpf-linker 0.10.2, which links
# that LLVM (agent/tests/deploy.rs keeps these equal to xtask's).
FROM docker.io/library/rust:1.95-bookworm AS builder
ARG NIGHTLY=nightly-2026-05-19
ARG BPF_LINKER_VERSION=0.10.2
RUN rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src \
 && ln -s "$RUSTUP_HOME/toolchains/$NIGHTLY-x86_64-unknown-linux-gnu" \
          "$RUSTUP_HOME/toolchains/nightly-x86_64-unknown-linux-gnu" \
 && cargo install "bpf-linker@$BPF_LINKER_VERSION" --locked
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sluice \
 && install -D target/release/sluice /out/sluice

# Runtime: glibc and util-linux (the init container's mount of bpffs), nothing else.
FROM docker.io/library/debian:bookworm-slim
COPY --from=builder /out/sluice /usr/local/bin/sluice
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["agent"]
