# s3blk: one image for the CSI controller, the node plugin and the CLI.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin s3blk \
 && install -D -m 0755 target/release/s3blk /out/s3blk

FROM debian:bookworm-slim
# What the node plugin runs (see PROGRAMS in src/csi/mount.rs): mkfs and
# resize for ext4 and xfs; blkid, blockdev, mount; modprobe for the nbd
# module; CA certificates for HTTPS to S3. (It attaches /dev/nbdX itself.)
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      e2fsprogs xfsprogs util-linux mount kmod ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/s3blk /usr/local/bin/s3blk
# Non-root by default (the controller); the node DaemonSet runs privileged as root.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/s3blk"]
