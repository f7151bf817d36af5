#!/usr/bin/env bash
# build.sh [ARM_DIR] — build an emulated Raspberry Pi (aarch64) Python 3.11 + torch environment in
# ARM_DIR (default /work/main/.arm) without installing anything system-wide:
#   ARM_DIR/qemu     qemu-aarch64-static, from the amd64 qemu-user-static .deb (unpacked, not installed)
#   ARM_DIR/sysroot  Debian bookworm arm64 python3.11 and its library closure (.debs unpacked)
#   ARM_DIR/site     the pinned aarch64 wheels (pip --target)
#   ARM_DIR/MANIFEST every downloaded .deb and wheel with its size
# Idempotent: each step leaves a stamp in ARM_DIR/stamps (holding its inputs, e.g. PINS) and is skipped
# while that stamp matches; changing PINS or DEB_ROOTS redoes that step, deleting a stamp (or ARM_DIR)
# redoes it too. Then run things with tools/armpi/run.sh.
set -euo pipefail

# aarch64 wheels, all pinned, no dependency resolution. torch stays at 2.9.1, the CPU-only aarch64 wheel
# on PyPI that works on a Pi 4: torch 2.10.0 dies with "Illegal instruction" on cortex-a72, and the 2.11+
# aarch64 wheels on PyPI are CUDA builds that pull gigabytes of nvidia-* packages. numpy and click match
# constraints.txt. The rest is the minimal set of torch 2.9.1's pure-Python dependencies (x86 .venv
# versions): `import torch` needs only typing-extensions; optimizer.step() imports torch._dynamo, which
# needs sympy (+ mpmath); torch.export.load also needs networkx and filelock. Left out (add them if the
# device code comes to need them): jinja2 + markupsafe (torch.compile/inductor), fsspec (remote files).
PINS="torch==2.9.1 numpy==2.3.5 click==8.5.1 typing-extensions==4.16.0 sympy==1.14.0 mpmath==1.3.0
networkx==3.6.1 filelock==4.2.11"
# Debian arm64 packages whose dependency closure makes the sysroot. libstdc++6 is not needed by python3.11
# itself but by torch's and numpy's native libraries (manylinux wheels don't bundle it).
DEB_ROOTS="python3.11 libstdc++6"
SUITE=bookworm
WHEEL_PLATFORMS=(--platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64
                 --platform manylinux_2_17_aarch64 --python-version 3.11 --implementation cp --only-binary=:all:)

die() { echo "build.sh: ERROR: $*" >&2; exit 1; }
step() { echo "[armpi] ${SECONDS}s: $*"; }
trap 'die "failed at line $LINENO: $BASH_COMMAND"' ERR

ARM=$(realpath -m "${1:-/work/main/.arm}")
STAMPS=$ARM/stamps
mkdir -p "$STAMPS"
# have STEP [INPUTS]: true if STEP was done with these inputs; else drops its stamp, as STEP is redone
have() { [[ -e $STAMPS/$1 && "$(cat "$STAMPS/$1")" == "${2:-}" ]] || { rm -f "$STAMPS/$1"; return 1; }; }
mark() { printf '%s' "${2:-}" > "$STAMPS/$1"; }   # mark STEP [INPUTS]: STEP done
# size of each downloaded file into the manifest: "<section> <file> <bytes>"
manifest() { local f; for f in "${@:2}"; do echo "$1 $(basename "$f") $(stat -c %s "$f")"; done >> "$ARM/MANIFEST"; }

# --- 1. qemu-user-static (amd64), with the host's apt config (needs the host's apt lists: apt-get update).
if ! have qemu; then
    step "qemu-user-static: download + unpack qemu-aarch64-static"
    tmp=$ARM/tmp-qemu; rm -rf "$tmp" "$ARM/qemu" && mkdir -p "$tmp" "$ARM/qemu/usr/bin"
    # Sandbox::User=root: _apt may not be able to write into ARM_DIR; this is a plain file download.
    (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root qemu-user-static >/dev/null) \
        || die "apt-get download qemu-user-static failed (has 'apt-get update' been run on this machine?)"
    sed -i '/^qemu /d' "$ARM/MANIFEST" 2>/dev/null || true
    manifest qemu "$tmp"/*.deb
    dpkg-deb -x "$tmp"/qemu-user-static_*.deb "$tmp/x"
    # keep only the aarch64 emulator: the .deb unpacks ~370 MB of emulators for every architecture
    mv "$tmp/x/usr/bin/qemu-aarch64-static" "$ARM/qemu/usr/bin/" || die "no qemu-aarch64-static in the .deb"
    rm -rf "$tmp"
    mark qemu
fi

# --- 2. Private apt for arm64: its own sources, state, cache, empty dpkg status and config file; the
# host's dpkg database, sources and architectures are never touched. Signatures are still verified,
# against the system's Debian archive keyring.
APTDIR=$ARM/apt
APT_OPTS=(-c "$APTDIR/apt.conf")
if ! have apt-update; then
    step "arm64 apt index: update (private config in $APTDIR)"
    rm -rf "$APTDIR" && mkdir -p "$APTDIR"/{state/lists/partial,cache/archives/partial}
    : > "$APTDIR/status"
    # The mirrors and bookworm suites this machine's own apt uses (whatever its sources format).
    # shellcheck disable=SC2016  # $(REPO_URI) is apt's format syntax, not the shell's
    apt-get indextargets --no-release-info --format '$(REPO_URI) $(RELEASE)' | sort -u \
        | awk -v s="$SUITE" '$2 ~ "^"s"(-updates|-security)?$" {
              print "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]", $1, $2, "main" }' \
        > "$APTDIR/sources.list"
    [[ -s $APTDIR/sources.list ]] || echo "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]" \
        "http://deb.debian.org/debian $SUITE main" > "$APTDIR/sources.list"
    cat > "$APTDIR/apt.conf" <<CONF
Dir::State "$APTDIR/state";
Dir::State::status "$APTDIR/status";
Dir::Cache "$APTDIR/cache";
Dir::Etc::SourceList "$APTDIR/sources.list";
Dir::Etc::SourceParts "/dev/null";
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
APT::Sandbox::User "root";
// the host's update hooks (packagekit, appstream) are about the host's apt, not this one
#clear APT::Update::Post-Invoke-Success;
#clear APT::Update::Post-Invoke;
CONF
    apt-get "${APT_OPTS[@]}" -q update > "$APTDIR/update.log" 2>&1 \
        || { cat "$APTDIR/update.log" >&2; die "private arm64 apt-get update failed"; }
    # apt-get update exits 0 after some fetch or signature failures: refuse to go on if any were reported
    if grep -qE '^(W|E):' "$APTDIR/update.log"; then cat "$APTDIR/update.log" >&2; die "apt-get update warned"; fi
    step "arm64 apt index: $(grep -E '^Fetched' "$APTDIR/update.log" || echo 'up to date')"
    mark apt-update
fi

# --- 3. arm64 sysroot: DEB_ROOTS and their dependencies, downloaded and unpacked (no maintainer scripts).
SYSROOT=$ARM/sysroot
if ! have sysroot "$DEB_ROOTS"; then
    rm -f "$STAMPS/smoke" "$STAMPS/bytecode"
    step "arm64 sysroot: resolve dependencies of: $DEB_ROOTS"
    # apt's own resolver simulating an install onto an empty system (the private empty status file):
    # the real closure, first alternatives only, no Recommends, exact versions.
    # shellcheck disable=SC2086  # DEB_ROOTS is a word list
    apt-get "${APT_OPTS[@]}" -s --no-install-recommends install $DEB_ROOTS \
        | awk '$1 == "Inst" { gsub(/[()]/, "", $3); print $2 "=" $3 }' | sort > "$ARM/debs-arm64.list"
    [[ -s $ARM/debs-arm64.list ]] || die "could not resolve $DEB_ROOTS for arm64"
    step "arm64 sysroot: download + unpack $(wc -l < "$ARM/debs-arm64.list") packages"
    tmp=$ARM/tmp-debs; rm -rf "$tmp" "$SYSROOT" && mkdir -p "$tmp" "$SYSROOT"
    # shellcheck disable=SC2046  # one word per package
    (cd "$tmp" && apt-get "${APT_OPTS[@]}" -q download $(cat "$ARM/debs-arm64.list") >/dev/null) \
        || die "apt-get download of the arm64 packages failed"
    sed -i '/^deb /d' "$ARM/MANIFEST" 2>/dev/null || true
    manifest deb "$tmp"/*.deb
    for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$SYSROOT"; done
    rm -rf "$tmp"
    [[ -x $SYSROOT/usr/bin/python3.11 ]] || die "no usr/bin/python3.11 in the sysroot"
    mark sysroot "$DEB_ROOTS"
fi

# --- 4. aarch64 wheels into ARM_DIR/site: the host's pip, told the target platform, no dependency
# resolution (every package is pinned above).
SITE=$ARM/site
if ! have site "$PINS"; then
    rm -f "$STAMPS/smoke" "$STAMPS/bytecode"
    step "aarch64 wheels: ${PINS//$'\n'/ }"
    HOSTPY=$(command -v python3.11 || command -v python3 || true)
    [[ -n $HOSTPY ]] || die "a host python3 with pip is needed"
    tmp=$ARM/tmp-wheels; rm -rf "$tmp" "$SITE" && mkdir -p "$tmp" "$SITE"
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
    # (grep -v: drop the warnings about this machine's pip.conf extra file:// indexes lacking a package)
    # shellcheck disable=SC2086  # PINS is a word list
    "$HOSTPY" -m pip download -q --no-deps "${WHEEL_PLATFORMS[@]}" -d "$tmp" $PINS \
        2> >(grep -v 'is neither a file nor a directory' >&2) || die "pip download of the aarch64 wheels failed"
    "$HOSTPY" -m pip install -q --no-deps --no-index --no-compile "${WHEEL_PLATFORMS[@]}" --target "$SITE" \
        "$tmp"/*.whl || die "pip install --target of the aarch64 wheels failed"
    sed -i '/^wheel /d' "$ARM/MANIFEST" 2>/dev/null || true
    manifest wheel "$tmp"/*.whl
    rm -rf "$tmp"
    mark site "$PINS"
fi

# --- 5. Bytecode, compiled natively: the .debs ship no .pyc (Debian makes them in postinst scripts,
# which never run here) and pip --no-compile made none; with PYTHONDONTWRITEBYTECODE set, or a read-only
# ARM_DIR, the emulated python would recompile every module on every run: import torch takes ~23 s
# emulated without .pyc and ~10 s with. A .pyc is portable across 3.11.x, so only a 3.11 host can do it.
if ! have bytecode; then
    HOSTPY=$(command -v python3.11 || true)
    if [[ -n $HOSTPY ]] && "$HOSTPY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        step "bytecode: compileall of site + the sysroot's stdlib (native $HOSTPY)"
        "$HOSTPY" -m compileall -q -j 0 "$SITE" "$SYSROOT/usr/lib/python3.11" \
            || die "compileall failed"
        mark bytecode
    else
        step "bytecode: skipped, no host python3.11 (the emulated python will compile as it imports)"
    fi
fi

# --- 6. Smoke test: the emulated interpreter starts and imports the pinned packages.
if ! have smoke; then
    step "smoke test under qemu cortex-a72 (import torch takes 10-25 s emulated)"
    "$(dirname "$0")/run.sh" "$ARM" cortex-a72 -c 'import platform, click, numpy, torch
print("[armpi] ok:", platform.machine(), "python", platform.python_version(), "torch", torch.__version__,
      "numpy", numpy.__version__)' || die "the emulated python cannot import torch"
    mark smoke
fi
step "ready: $ARM ($(du -sh "$ARM" | cut -f1) on disk; downloaded $(awk '{n++; s += $3} END {
    printf "%d files, %.1f MB", n, s / 1e6}' "$ARM/MANIFEST") + the apt index)"
