#!/usr/bin/env bash
# run.sh ARM_DIR CPU [PYTHON ARGS...] — run the aarch64 python3.11 that build.sh put in ARM_DIR under
# qemu user-mode emulation as the given CPU: cortex-a72 = Raspberry Pi 4, cortex-a76 = Pi 5.
# (Not "-cpu max": it prints spurious floating-point warnings.) Python sees ARM_DIR/site (the pinned
# wheels); ARM_PYTHONPATH, if set, goes in front of it, e.g.
#   ARM_PYTHONPATH=/work/main tools/armpi/run.sh .arm cortex-a72 -m progfl.cli --help
set -euo pipefail

[[ $# -ge 2 ]] || { echo "usage: $0 ARM_DIR CPU [python args...]" >&2; exit 2; }
ARM=$(realpath -m "$1"); CPU=$2; shift 2
QEMU=$ARM/qemu/usr/bin/qemu-aarch64-static
SYSROOT=$ARM/sysroot
[[ -x $QEMU && -x $SYSROOT/usr/bin/python3.11 && -d $ARM/site ]] \
    || { echo "run.sh: $ARM is not built: run tools/armpi/build.sh $ARM" >&2; exit 2; }

# -L and QEMU_LD_PREFIX: the guest's dynamic loader and libraries come from the sysroot (qemu tries
# every guest path there first). Python derives its prefix from the interpreter's own path, so it finds
# the sysroot's stdlib by itself: no PYTHONHOME. PYTHONNOUSERSITE and a PYTHONPATH of our own keep the
# host's x86 packages (~/.local, the caller's PYTHONPATH) out of the guest.
export QEMU_LD_PREFIX=$SYSROOT
export PYTHONNOUSERSITE=1
export PYTHONPATH=${ARM_PYTHONPATH:+$ARM_PYTHONPATH:}$ARM/site
unset PYTHONHOME PYTHONSTARTUP
# Without binfmt_misc (nothing is registered system-wide) a guest process cannot exec the guest's python:
# progfl's memory probe starts its fresh interpreter with this command instead of sys.executable.
export PROGFL_PROBE_PYTHON="$QEMU -cpu $CPU -L $SYSROOT $SYSROOT/usr/bin/python3.11"
exec "$QEMU" -cpu "$CPU" -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" "$@"
