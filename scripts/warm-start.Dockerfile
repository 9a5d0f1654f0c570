# A container image whose entrypoint starts a service warm, for Docker:
# scripts/container-image.sh --docker TAG -- SERVICE builds it, from the root file system the
# script makes (rootfs.tar in the build context: the service at /app/service, its libraries,
# crac, crac-action and CRIU). `crac run` restores the checkpoint named `service` in the
# image's store when there is one, and starts the command cold otherwise, saying why.
#
# The command is the container's (`docker run ... TAG /app/service ARGS`); `docker commit`
# of the warm-up keeps it. XTDB's entrypoint modes are crac run's: restore or start cold (the
# default), restore only (`--entrypoint` with `crac run --restore-only`, failing when the
# checkpoint cannot be used), and making the checkpoint (the warm-up: a cold start in which
# the service checkpoints itself, or `docker exec ... crac checkpoint --leave-running`).
FROM scratch
ADD rootfs.tar /
ENV PATH=/usr/local/bin:/usr/bin:/usr/sbin CRAC_STORE=/var/lib/crac/images
ENTRYPOINT ["/usr/local/bin/crac", "run", "--log", "-", "--image", "service", "--"]
CMD ["/app/service"]
