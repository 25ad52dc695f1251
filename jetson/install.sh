#!/usr/bin/env bash
# Install edge-ad on an NVIDIA Jetson as a systemd service.
#
# Supported: JetPack 5.1.x (L4T R35.2+, TensorRT 8.5, CUDA 11.4, Ubuntu 20.04),
#            JetPack 6.0 (R36.3, TensorRT 8.6, CUDA 12.2), JetPack 6.1 / 6.2 (R36.4, TensorRT 10.3, CUDA 12.6),
#            JetPack 7.x (R38+, TensorRT 10.13+, CUDA 13, Ubuntu 24.04).
#
# What it does (each step is skipped when already done, so it is safe to run again to upgrade):
#   1. detects the L4T / JetPack release (/etc/nv_tegra_release, else the nvidia-l4t-core package);
#   2. makes a Python venv WITH the system site packages, so JetPack's TensorRT bindings
#      (python3-libnvinfer) and JetPack's OpenCV (built with GStreamer, for CSI cameras) are used;
#      JetPack 5 ships Python 3.8, edge-ad needs >= 3.10: python3.10 comes from the deadsnakes PPA and
#      the TensorRT bindings are built for it from NVIDIA's TensorRT OSS sources (--trt-bindings);
#   3. installs edge-ad (a source folder as a wheel built from a temporary copy of it: the folder is only
#      read) WITHOUT letting pip put opencv-python-headless over the system OpenCV, keeps
#      numpy < 2 (JetPack's OpenCV and TensorRT are built against numpy 1.x), and installs the
#      cuda-python matching the CUDA version;
#   4. links /usr/local/bin/edge-ad to the venv's edge-ad; creates the service user (groups video,
#      render, gpio, i2c where they exist), the config folder (/etc/edge-ad: config.toml, set to ONNX
#      Runtime on the CPU where no TensorRT is installed, e.g. JetPack 5) and the data folder (/var/lib/edge-ad);
#   5. installs edge-ad.service (and, with --clocks, edge-ad-clocks.service) and runs `edge-ad doctor`.
#
# Usage: sudo jetson/install.sh [options]      (jetson/install.sh --help for the options)

set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "${SCRIPT_DIR}/.." && pwd)

PREFIX=/opt/edge-ad
CONFIG_DIR=/etc/edge-ad
DATA_DIR=/var/lib/edge-ad
SERVICE_USER=edge-ad
UNIT_DIR=/etc/systemd/system
BIN_LINK=/usr/local/bin/edge-ad    # on PATH, also for sudo -u edge-ad (secure_path)
PACKAGE=""            # what to pip install: a folder, a wheel or a requirement (default: this repository)
PYTHON=""             # interpreter for the venv (default: per JetPack)
L4T_OVERRIDE=""
TRT_BINDINGS=auto     # auto | system | build | none
OPENCV=auto           # auto | system | pip
WITH_USER=1
WITH_SERVICE=1
ENABLE=0
CLOCKS=0
DRY_RUN=0
ACTION=install        # install | plan | render-unit | render-config | build-wheel
RENDER_OUT=""
STAGE_DIR=""          # the temporary copy of a source folder a wheel is built from (removed at exit)
ASSUME_YES=0

log() { printf '[edge-ad] %s\n' "$*"; }
warn() { printf '[edge-ad] warning: %s\n' "$*" >&2; }
die() { printf '[edge-ad] error: %s\n' "$*" >&2; exit 1; }

# Run a command that changes the system; with --dry-run, print it instead.
run() {
    if [[ ${DRY_RUN} -eq 1 ]]; then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

usage() {
    cat <<'EOF'
Usage: sudo jetson/install.sh [options]

  --package SPEC       what to install: a source folder, a wheel file or a pip requirement
                       (default: the repository this script is in)
  --prefix DIR         install root; the venv goes to DIR/venv            (default /opt/edge-ad)
  --config-dir DIR     config.toml and edge-ad.env go here               (default /etc/edge-ad)
  --data-dir DIR       bundle, outbox, logs, snapshots                   (default /var/lib/edge-ad)
  --user NAME          service user                                      (default edge-ad)
  --python PATH        Python >= 3.10 for the venv (default: python3; python3.10 on JetPack 5)
  --trt-bindings MODE  auto | system | build | none   TensorRT Python bindings: JetPack's package
                       (system), built from TensorRT OSS for the venv's Python (build; JetPack 5),
                       or none (ONNX Runtime only). auto: system, or none on JetPack 5
                       (its TensorRT 8.5 is older than the 8.6 edge-ad compile needs).
  --opencv MODE        auto | system | pip   system: JetPack's OpenCV with GStreamer (CSI cameras);
                       pip: opencv-python-headless (no GStreamer: USB / RTSP / files only)
  --enable             enable and start edge-ad.service now (do this once a bundle is in place)
  --clocks             also install edge-ad-clocks.service (jetson_clocks at boot: steady latency)
  --no-user            do not create the service user (containers)
  --no-service         do not install the systemd unit (containers)
  --l4t VERSION        take this L4T version (e.g. 36.4.3) instead of detecting it
  --dry-run            print what would be done, change nothing
  --print-plan         print the detected release and the choices, then exit
  --render-unit FILE   write edge-ad.service for these options to FILE, then exit
  --render-config FILE write the config.toml a first install writes to FILE, then exit
                       (backend onnxruntime on the CPU where no TensorRT is installed: JetPack 5,
                       --trt-bindings none; else tensorrt on cuda:0)
  --build-wheel DIR    build the wheel an install of a source folder (--package, default this
                       repository) installs into DIR with --python's pip, then exit
  -y, --yes            do not ask before adding the deadsnakes PPA (JetPack 5)
  -h, --help           this help
EOF
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --package) PACKAGE=${2:?--package needs a value}; shift 2 ;;
        --prefix) PREFIX=${2:?--prefix needs a value}; shift 2 ;;
        --config-dir) CONFIG_DIR=${2:?--config-dir needs a value}; shift 2 ;;
        --data-dir) DATA_DIR=${2:?--data-dir needs a value}; shift 2 ;;
        --user) SERVICE_USER=${2:?--user needs a value}; shift 2 ;;
        --python) PYTHON=${2:?--python needs a value}; shift 2 ;;
        --trt-bindings) TRT_BINDINGS=${2:?--trt-bindings needs a value}; shift 2 ;;
        --opencv) OPENCV=${2:?--opencv needs a value}; shift 2 ;;
        --enable) ENABLE=1; shift ;;
        --clocks) CLOCKS=1; shift ;;
        --no-user) WITH_USER=0; shift ;;
        --no-service) WITH_SERVICE=0; shift ;;
        --l4t) L4T_OVERRIDE=${2:?--l4t needs a value}; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --print-plan) ACTION=plan; shift ;;
        --render-unit) ACTION=render-unit; RENDER_OUT=${2:?--render-unit needs a file}; shift 2 ;;
        --render-config) ACTION=render-config; RENDER_OUT=${2:?--render-config needs a file}; shift 2 ;;
        --build-wheel) ACTION=build-wheel; RENDER_OUT=${2:?--build-wheel needs a folder}; shift 2 ;;
        -y|--yes) ASSUME_YES=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option '$1'" ;;
    esac
done

case "${TRT_BINDINGS}" in auto|system|build|none) ;; *) die "--trt-bindings ${TRT_BINDINGS}: expected auto, system, build or none" ;; esac
case "${OPENCV}" in auto|system|pip) ;; *) die "--opencv ${OPENCV}: expected auto, system or pip" ;; esac
[[ ${SERVICE_USER} =~ ^[a-z_][a-z0-9_-]*$ ]] || die "--user ${SERVICE_USER}: not a valid user name"
for d in "${PREFIX}" "${CONFIG_DIR}" "${DATA_DIR}"; do
    [[ ${d} == /* ]] || die "${d}: paths must be absolute"
done

if [[ -n ${L4T_OVERRIDE} && ! ${L4T_OVERRIDE#[Rr]} =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?$ ]]; then
    die "--l4t ${L4T_OVERRIDE}: expected a version like 36.4.3"
fi

VENV="${PREFIX}/venv"
VPY="${VENV}/bin/python"

# ----------------------------------------------------------------------------- release detection
detect_l4t() {
    local line re v
    if [[ -n ${L4T_OVERRIDE} ]]; then
        printf '%s\n' "${L4T_OVERRIDE#[Rr]}"
        return 0
    fi
    if [[ -r /etc/nv_tegra_release ]]; then
        line=$(head -n 1 /etc/nv_tegra_release)
        re='R([0-9]+)[^,]*, *REVISION: *([0-9.]+)'
        if [[ ${line} =~ ${re} ]]; then
            printf '%s.%s\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]%.}"
            return 0
        fi
    fi
    if v=$(dpkg-query -W -f='${Version}' nvidia-l4t-core 2>/dev/null) && [[ ${v} =~ ^([0-9]+\.[0-9]+(\.[0-9]+)?) ]]; then
        printf '%s\n' "${BASH_REMATCH[1]}"
        return 0
    fi
    return 1
}

# JetPack release of an L4T version (kept in step with edge_ad/doctor.py JETPACK_BY_L4T).
jetpack_name() {
    case "$1" in
        35.2|35.2.*) echo "5.1" ;;
        35.3|35.3.*) echo "5.1.1" ;;
        35.4|35.4.*) echo "5.1.2" ;;
        35.5|35.5.*) echo "5.1.3" ;;
        35.6|35.6.*) echo "5.1.4" ;;
        36.2|36.2.*) echo "6.0 DP" ;;
        36.3|36.3.*) echo "6.0" ;;
        36.4.3) echo "6.2" ;;
        36.4.4|36.4.7) echo "6.2.1" ;;
        36.4|36.4.*) echo "6.1" ;;
        38.2|38.2.*) echo "7.0" ;;
        38.4|38.4.*) echo "7.1" ;;
        38.*|39.*) echo "7.x" ;;
        *) echo "unknown" ;;
    esac
}

# Sets JP_MAJOR, TRT_SERIES, CUDA_DEFAULT, UBUNTU, PY_DEFAULT from the L4T version.
plan_for_l4t() {
    local l4t=$1 major rest minor
    major=${l4t%%.*}
    rest=${l4t#*.}
    minor=${rest%%.*}
    case "${major}" in
        35)
            [[ ${minor} -ge 2 ]] || die "L4T R${l4t} is JetPack 5.0.x: update to JetPack 5.1 or later (sudo apt upgrade, or reflash)"
            JP_MAJOR=5; TRT_SERIES=8.5; CUDA_DEFAULT=11.4; UBUNTU=20.04; PY_DEFAULT=python3.10 ;;
        36)
            JP_MAJOR=6; UBUNTU=22.04; PY_DEFAULT=python3
            if [[ ${minor} -le 3 ]]; then TRT_SERIES=8.6; CUDA_DEFAULT=12.2; else TRT_SERIES=10.3; CUDA_DEFAULT=12.6; fi ;;
        38|39)
            JP_MAJOR=7; TRT_SERIES=10.13+; CUDA_DEFAULT=13.0; UBUNTU=24.04; PY_DEFAULT=python3 ;;
        *)
            die "L4T R${l4t} is not supported: edge-ad needs JetPack 5.1 (R35.2+), 6.x (R36) or 7.x (R38+); JetPack 4 (R32) ships Python 3.6" ;;
    esac
}

# The CUDA major.minor installed (version.json, else the cudart package), else the JetPack default.
detect_cuda() {
    local v pkg re
    re='"cuda"[^}]*"version" *: *"([0-9]+)\.([0-9]+)'
    if [[ -r /usr/local/cuda/version.json ]] && [[ $(tr -d '\n' < /usr/local/cuda/version.json) =~ ${re} ]]; then
        printf '%s.%s\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"
        return 0
    fi
    if pkg=$(dpkg-query -W -f='${Package}\n' 'cuda-cudart-[0-9]*' 2>/dev/null | sort -V | tail -n 1) && [[ ${pkg} =~ cuda-cudart-([0-9]+)-([0-9]+) ]]; then
        printf '%s.%s\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"
        return 0
    fi
    v=${CUDA_DEFAULT}
    printf '%s\n' "${v}"
}

# cuda-python release line that matches a CUDA major.minor.
cuda_python_spec() {
    local major=${1%%.*} minor=${1#*.}
    minor=${minor%%.*}
    case "${major}" in
        11) echo "cuda-python>=11.4,<12" ;;
        12) echo "cuda-python>=12.${minor},<12.$((minor + 1))" ;;
        *) echo "cuda-python>=${major}.0,<$((major + 1))" ;;
    esac
}

L4T=$(detect_l4t) || die "not a Jetson: no /etc/nv_tegra_release and no nvidia-l4t-core package (use --l4t VERSION to override; on a PC, pip install edge-ad instead)"
plan_for_l4t "${L4T}"
JETPACK=$(jetpack_name "${L4T}")
CUDA_VERSION=$(detect_cuda)
CUDA_PYTHON=$(cuda_python_spec "${CUDA_VERSION}")
PYTHON=${PYTHON:-${PY_DEFAULT}}
if [[ ${TRT_BINDINGS} == auto ]]; then
    # JetPack 5's TensorRT is 8.5: 'edge-ad compile' needs 8.6 or newer, so building bindings for it
    # (about 10 minutes) would buy nothing; ONNX Runtime runs the models there
    if [[ ${JP_MAJOR} -eq 5 ]]; then TRT_BINDINGS=none; else TRT_BINDINGS=system; fi
fi
# the config's backend: TensorRT where its bindings are installed and new enough (not JetPack 5's 8.5)
if [[ ${JP_MAJOR} -eq 5 || ${TRT_BINDINGS} == none ]]; then
    BACKEND=onnxruntime; DEVICE=cpu
else
    BACKEND=tensorrt; DEVICE=cuda:0
fi
if [[ ${OPENCV} == auto ]]; then
    # JetPack 5's OpenCV is built for its Python 3.8, which edge-ad cannot use
    if [[ ${JP_MAJOR} -eq 5 ]]; then OPENCV=pip; else OPENCV=system; fi
fi

print_plan() {
    cat <<EOF
L4T=${L4T}
JETPACK=${JETPACK}
TENSORRT=${TRT_SERIES}
CUDA=${CUDA_VERSION}
UBUNTU=${UBUNTU}
PYTHON=${PYTHON}
CUDA_PYTHON=${CUDA_PYTHON}
TRT_BINDINGS=${TRT_BINDINGS}
OPENCV=${OPENCV}
BACKEND=${BACKEND}
DEVICE=${DEVICE}
PREFIX=${PREFIX}
VENV=${VENV}
BIN_LINK=${BIN_LINK}
CONFIG_DIR=${CONFIG_DIR}
DATA_DIR=${DATA_DIR}
SERVICE_USER=${SERVICE_USER}
EOF
}

# edge-ad.service with this install's paths and user.
render_unit() {
    sed -e "s|/opt/edge-ad|${PREFIX}|g" \
        -e "s|/etc/edge-ad|${CONFIG_DIR}|g" \
        -e "s|/var/lib/edge-ad|${DATA_DIR}|g" \
        -e "s|^User=edge-ad$|User=${SERVICE_USER}|" \
        -e "s|^Group=edge-ad$|Group=${SERVICE_USER}|" \
        "${SCRIPT_DIR}/edge-ad.service"
}

# config.toml with this install's data folder and backend
render_config() {
    local -a edits=(-e "s|/var/lib/edge-ad|${DATA_DIR}|g")
    if [[ ${BACKEND} != tensorrt ]]; then
        edits+=(-e "s|^backend = \"tensorrt\" .*|backend = \"${BACKEND}\"              # this install has no usable TensorRT (install.sh)|"
                -e "s|^device = \"cuda:0\"|device = \"${DEVICE}\"|")
    fi
    sed "${edits[@]}" "${SCRIPT_DIR}/config.toml"
}

# The wheel of source folder SRC, built with Python PY into folder OUT. It is built from a copy of SRC in
# a temporary folder, not in SRC: pip builds a folder in place, which left a root-owned build/ and
# edge_ad.egg-info in the user's clone, and the next build (git pull, install.sh again) reused that
# build/lib, so modules deleted from the source were installed again. The copy leaves out .git, .venv and
# what earlier builds left (build/, dist/, *.egg-info, __pycache__); SRC is only read.
build_wheel() {
    local py=$1 src=$2 out=$3
    [[ -f ${src}/pyproject.toml ]] || die "${src}: not an edge-ad source folder (no pyproject.toml); --package takes a source folder, a wheel or a requirement"
    STAGE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/edge-ad-src.XXXXXX")
    tar -C "${src}" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "${STAGE_DIR}" -xf - \
        || die "${src}: could not be copied to ${STAGE_DIR} to build the wheel"
    mkdir -p "${out}"
    "${py}" -m pip wheel --no-deps --wheel-dir "${out}" "${STAGE_DIR}" \
        || die "building the edge-ad wheel from ${src} failed (pip's messages above)"
    rm -rf "${STAGE_DIR}"
    STAGE_DIR=""
}
trap '[[ -z ${STAGE_DIR} ]] || rm -rf "${STAGE_DIR}"' EXIT

case "${ACTION}" in
    plan) print_plan; exit 0 ;;
    render-unit) render_unit > "${RENDER_OUT}"; exit 0 ;;
    render-config) render_config > "${RENDER_OUT}"; exit 0 ;;
    build-wheel) build_wheel "${PYTHON}" "${PACKAGE:-${REPO_DIR}}" "${RENDER_OUT}"; exit 0 ;;
esac

# ----------------------------------------------------------------------------- install
if [[ ${DRY_RUN} -eq 0 && ${EUID} -ne 0 ]]; then
    die "run as root (sudo $0 ...), or with --dry-run to see what it would do"
fi
log "L4T R${L4T} = JetPack ${JETPACK}: TensorRT ${TRT_SERIES}, CUDA ${CUDA_VERSION}, Ubuntu ${UBUNTU}"
export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0
apt_install() {
    if [[ ${APT_UPDATED} -eq 0 ]]; then
        run apt-get update
        APT_UPDATED=1
    fi
    run apt-get install -y --no-install-recommends "$@"
}

# Does the venv's Python import this module? (false in a dry run before the venv exists)
venv_imports() {
    [[ -x ${VPY} ]] && "${VPY}" -c "import $1" >/dev/null 2>&1
}

# --- 1. Python >= 3.10
# 0: runs and is >= 3.10; 1: runs but is older; 2: does not run
python_state() {
    local out
    out=$("${PYTHON}" -c 'import sys; print(1 if sys.version_info >= (3, 10) else 0)' 2>/dev/null) || return 2
    [[ ${out} == 1 ]] && return 0
    return 1
}

ensure_python() {
    local state=0 answer
    python_state || state=$?
    if [[ ${state} -eq 1 ]]; then
        die "${PYTHON} is $("${PYTHON}" -V 2>&1); edge-ad needs Python >= 3.10 (--python PATH)"
    fi
    if [[ ${state} -eq 2 ]]; then
        [[ ${PYTHON} == python3.10 && ${JP_MAJOR} -eq 5 ]] || die "${PYTHON} not found; install it or give another with --python PATH"
        log "JetPack 5 ships Python 3.8; edge-ad needs 3.10: installing python3.10 from the deadsnakes PPA"
        if [[ ${ASSUME_YES} -eq 0 && ${DRY_RUN} -eq 0 && -t 0 ]]; then
            read -r -p "Add ppa:deadsnakes/ppa to apt sources? [y/N] " answer
            [[ ${answer} == [yY]* ]] || die "no Python >= 3.10; give one with --python PATH"
        fi
        apt_install software-properties-common
        run add-apt-repository -y ppa:deadsnakes/ppa
        APT_UPDATED=0
        apt_install python3.10 python3.10-venv python3.10-dev
        [[ ${DRY_RUN} -eq 1 ]] && return 0
        python_state || die "python3.10 still does not run after installing it"
    fi
    if ! "${PYTHON}" -c 'import ensurepip' >/dev/null 2>&1; then
        apt_install "$(basename "${PYTHON}")-venv"
    fi
}

# --- 2. the venv, with the system site packages (TensorRT, OpenCV with GStreamer)
make_venv() {
    if [[ -x ${VPY} ]] && "${VPY}" -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)' 2>/dev/null; then
        grep -q '^include-system-site-packages = true' "${VENV}/pyvenv.cfg" \
            || die "${VENV} exists without --system-site-packages; remove it (rm -rf ${VENV}) and run again"
        log "venv ${VENV} exists; upgrading in place"
    else
        run mkdir -p "${PREFIX}"
        run "${PYTHON}" -m venv --system-site-packages "${VENV}"
    fi
    run "${VPY}" -m pip install --upgrade pip wheel setuptools
}

# --- 3a. TensorRT Python bindings
system_trt() {
    if venv_imports tensorrt; then
        log "TensorRT bindings: $("${VPY}" -c 'import tensorrt; print(tensorrt.__version__)')"
        return 0
    fi
    log "installing JetPack's TensorRT Python bindings (python3-libnvinfer)"
    apt_install python3-libnvinfer
    if [[ ${DRY_RUN} -eq 0 ]] && ! venv_imports tensorrt; then
        warn "tensorrt still not importable from ${VENV}; edge-ad will run on ONNX Runtime (edge-ad doctor says why)"
    fi
}

build_trt() {
    # TensorRT OSS python/ builds bindings for any Python against the system libnvinfer (JetPack 5 only
    # ships them for its Python 3.8). Follows python/README.md of github.com/NVIDIA/TensorRT.
    if venv_imports tensorrt; then
        log "TensorRT bindings present: $("${VPY}" -c 'import tensorrt; print(tensorrt.__version__)')"
        return 0
    fi
    local trt_version branch pyver work pyconfig lib
    trt_version=$(dpkg-query -W -f='${Version}' libnvinfer8 2>/dev/null | cut -d- -f1 || true)
    if [[ -z ${trt_version} ]]; then
        [[ ${DRY_RUN} -eq 1 ]] || { warn "libnvinfer8 not installed (sudo apt install nvidia-tensorrt); skipping TensorRT bindings"; return 0; }
        trt_version=8.5.2
    fi
    branch="release/$(cut -d. -f1,2 <<<"${trt_version}")"
    pyver=$("${PYTHON}" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null || echo 3.10)
    log "building TensorRT ${trt_version} bindings for Python ${pyver} from TensorRT OSS ${branch} (several minutes)"
    apt_install git cmake build-essential "python${pyver}-dev" libnvinfer-dev libnvinfer-plugin-dev \
        libnvonnxparsers-dev libnvparsers-dev python3-wheel
    work=${PREFIX}/build/tensorrt-python
    run rm -rf "${work}"
    run mkdir -p "${work}/external/python${pyver}/include"
    run git clone --depth 1 --branch "${branch}" https://github.com/NVIDIA/TensorRT.git "${work}/TensorRT"
    run git clone --depth 1 --branch v2.6.2 https://github.com/pybind/pybind11.git "${work}/external/pybind11"
    run cp -r "/usr/include/python${pyver}/." "${work}/external/python${pyver}/include/"
    pyconfig=/usr/include/aarch64-linux-gnu/python${pyver}/pyconfig.h
    if [[ -f ${pyconfig} || ${DRY_RUN} -eq 1 ]]; then
        run cp "${pyconfig}" "${work}/external/python${pyver}/include/pyconfig.h"
    fi
    # build.sh looks for the TensorRT libraries in TensorRT/build: point it at JetPack's
    run mkdir -p "${work}/TensorRT/build"
    for lib in nvinfer nvinfer_plugin nvonnxparser nvparsers; do
        run ln -sf "/usr/lib/aarch64-linux-gnu/lib${lib}.so" "${work}/TensorRT/build/lib${lib}.so"
    done
    if ! run env -C "${work}/TensorRT/python" TRT_OSSPATH="${work}/TensorRT" EXT_PATH="${work}/external" \
            PYTHON_MAJOR_VERSION="${pyver%%.*}" PYTHON_MINOR_VERSION="${pyver#*.}" TARGET_ARCHITECTURE=aarch64 \
            bash ./build.sh; then
        warn "building the TensorRT bindings failed; edge-ad will run on ONNX Runtime. Log above; retry with --trt-bindings build"
        return 0
    fi
    if [[ ${DRY_RUN} -eq 1 ]]; then
        run "${VPY}" -m pip install "${work}/TensorRT/python/build/dist/tensorrt-${trt_version}-cp${pyver/./}-none-linux_aarch64.whl"
    else
        run "${VPY}" -m pip install "${work}"/TensorRT/python/build/dist/tensorrt-*.whl
    fi
}

# --- 3b. OpenCV
system_opencv() {
    if venv_imports cv2 && [[ $("${VPY}" -c 'import cv2; print(cv2.__file__)') != "${VENV}"/* ]]; then
        log "OpenCV: system $("${VPY}" -c 'import cv2; print(cv2.__version__)')"
        return 0
    fi
    log "installing JetPack's OpenCV (with GStreamer)"
    if [[ ${JP_MAJOR} -ge 7 ]]; then
        apt_install python3-opencv
    else
        apt_install nvidia-opencv
    fi
}

# --- 3c. edge-ad itself, its dependencies (except OpenCV), cuda-python
install_edge_ad() {
    local pkg=${PACKAGE:-${REPO_DIR}} constraints reqs wheel_dir
    local -a wheels
    constraints=${PREFIX}/constraints.txt
    # JetPack's OpenCV and TensorRT bindings are built against numpy 1.x
    if [[ ${DRY_RUN} -eq 1 ]]; then
        printf '+ write %s: numpy>=1.24,<2\n' "${constraints}"
    else
        printf 'numpy>=1.24,<2\n' > "${constraints}"
    fi
    log "installing edge-ad from ${pkg}"
    if [[ -d ${pkg} ]]; then
        # a source folder: its wheel, built from a clean copy (build_wheel says why)
        wheel_dir=${PREFIX}/build/wheel
        run rm -rf "${wheel_dir}"
        if [[ ${DRY_RUN} -eq 1 ]]; then
            printf '+ copy %s to a temporary folder (without .git, .venv, build/, dist/, *.egg-info)\n' "${pkg}"
            printf '+ %s -m pip wheel --no-deps --wheel-dir %s <the copy>\n' "${VPY}" "${wheel_dir}"
            pkg="${wheel_dir}/edge_ad-VERSION-py3-none-any.whl"
        else
            build_wheel "${VPY}" "${pkg}" "${wheel_dir}"
            wheels=("${wheel_dir}"/*.whl)
            [[ ${#wheels[@]} -eq 1 && -f ${wheels[0]} ]] || die "expected one wheel in ${wheel_dir}, found: ${wheels[*]}"
            pkg=${wheels[0]}
        fi
    fi
    # --force-reinstall: a wheel of the version installed (every build of a checkout is 0.1.0 until the
    # version changes) is otherwise skipped as 'already installed'; --no-deps keeps it to edge-ad
    run "${VPY}" -m pip install --no-deps --upgrade --force-reinstall "${pkg}"
    # its runtime requirements and those of its sign extra (cryptography: a line with an Ed25519 update_key
    # verifies bundle archives, bundle install --key and the MQTT update_model), except the OpenCV wheel when
    # the system OpenCV is used
    if [[ ${DRY_RUN} -eq 1 ]]; then
        printf '+ %s -m pip install -c %s <requirements of edge-ad and its sign extra%s>\n' "${VPY}" "${constraints}" \
            "$([[ ${OPENCV} == system ]] && echo ', without opencv-python-headless')"
    else
        reqs=$("${VPY}" - "${OPENCV}" <<'PY'
import re
import sys
from importlib.metadata import requires

skip_opencv = sys.argv[1] == "system"
for req in requires("edge-ad") or []:
    if "extra ==" in req:
        if not re.search(r"""extra\s*==\s*["']sign["']""", req):
            continue
        req = req.split(";", 1)[0].strip()
    name = re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0].lower()
    if skip_opencv and name.startswith("opencv"):
        continue
    print(req)
PY
)
        local -a req_list=()
        mapfile -t req_list < <(printf '%s\n' "${reqs}" | sed '/^$/d')
        if [[ ${#req_list[@]} -gt 0 ]]; then
            run "${VPY}" -m pip install -c "${constraints}" "${req_list[@]}"
        fi
    fi
    if [[ ${OPENCV} == system ]]; then
        # a wheel installed earlier (by hand or an older install) would hide the system OpenCV
        if [[ ${DRY_RUN} -eq 1 ]] || "${VPY}" -m pip show opencv-python-headless >/dev/null 2>&1 \
                || "${VPY}" -m pip show opencv-python >/dev/null 2>&1; then
            run "${VPY}" -m pip uninstall -y opencv-python-headless opencv-python
        fi
    fi
    if [[ ${TRT_BINDINGS} != none ]]; then
        log "installing ${CUDA_PYTHON} (CUDA ${CUDA_VERSION}) for the TensorRT backend"
        run "${VPY}" -m pip install -c "${constraints}" "${CUDA_PYTHON}"
    fi
}

# --- 4. edge-ad on PATH, user, folders, config
link_cli() {
    if [[ -e ${BIN_LINK} && ! -L ${BIN_LINK} ]]; then
        warn "${BIN_LINK} exists and is not a link: leaving it (${VENV}/bin/edge-ad is the one installed now)"
        return 0
    fi
    run install -d -m 0755 "$(dirname "${BIN_LINK}")"
    run ln -sfn "${VENV}/bin/edge-ad" "${BIN_LINK}"
}

make_user_and_dirs() {
    if [[ ${WITH_USER} -eq 1 ]]; then
        if ! id -u "${SERVICE_USER}" >/dev/null 2>&1; then
            run useradd --system --user-group --home-dir "${DATA_DIR}" --no-create-home \
                --shell /usr/sbin/nologin --comment "edge-ad inspection service" "${SERVICE_USER}"
        fi
        local group
        for group in video render gpio i2c; do
            if getent group "${group}" >/dev/null; then
                run usermod -a -G "${group}" "${SERVICE_USER}"
            fi
        done
    fi
    local owner=root
    [[ ${WITH_USER} -eq 1 ]] && owner=${SERVICE_USER}
    run install -d -m 0755 "${CONFIG_DIR}"
    run install -d -m 0750 -o "${owner}" -g "${owner}" "${DATA_DIR}" "${DATA_DIR}/snapshots" "${DATA_DIR}/state"
    if [[ ! -e ${CONFIG_DIR}/config.toml ]]; then
        log "writing ${CONFIG_DIR}/config.toml (edit the source and the MQTT broker; backend ${BACKEND}, device ${DEVICE})"
        if [[ ${DRY_RUN} -eq 1 ]]; then
            printf '+ write %s from %s (backend = "%s", device = "%s")\n' "${CONFIG_DIR}/config.toml" \
                "${SCRIPT_DIR}/config.toml" "${BACKEND}" "${DEVICE}"
        else
            render_config > "${CONFIG_DIR}/config.toml"
            chmod 0644 "${CONFIG_DIR}/config.toml"
        fi
    else
        log "keeping ${CONFIG_DIR}/config.toml"
        if [[ ${BACKEND} != tensorrt ]] && grep -q '^backend = "tensorrt"' "${CONFIG_DIR}/config.toml"; then
            warn "${CONFIG_DIR}/config.toml has backend = \"tensorrt\", which this install cannot run: set backend = \"onnxruntime\" and device = \"cpu\" in [model]"
        fi
    fi
    if [[ ! -e ${CONFIG_DIR}/edge-ad.env ]]; then
        run install -m 0640 -o root -g "${owner}" "${SCRIPT_DIR}/edge-ad.env" "${CONFIG_DIR}/edge-ad.env"
    fi
}

# --- 5. systemd
install_units() {
    [[ ${WITH_SERVICE} -eq 1 ]] || return 0
    if ! command -v systemctl >/dev/null 2>&1; then
        warn "no systemctl: not installing the service"
        return 0
    fi
    if [[ ${DRY_RUN} -eq 1 ]]; then
        printf '+ write %s/edge-ad.service (jetson/install.sh --render-unit FILE shows it)\n' "${UNIT_DIR}"
    else
        render_unit > "${UNIT_DIR}/edge-ad.service"
        chmod 0644 "${UNIT_DIR}/edge-ad.service"
    fi
    if [[ ${CLOCKS} -eq 1 ]]; then
        run install -m 0644 "${SCRIPT_DIR}/edge-ad-clocks.service" "${UNIT_DIR}/edge-ad-clocks.service"
    fi
    run systemctl daemon-reload
    if [[ ${CLOCKS} -eq 1 ]]; then
        run systemctl enable edge-ad-clocks.service
    fi
    if [[ ${ENABLE} -eq 1 ]]; then
        run systemctl enable --now edge-ad.service
    fi
}

ensure_python
make_venv
case "${TRT_BINDINGS}" in
    system) system_trt ;;
    build) build_trt ;;
    none) log "TensorRT bindings: not installed (--trt-bindings none): ONNX Runtime only" ;;
esac
if [[ ${OPENCV} == system ]]; then
    system_opencv
else
    warn "OpenCV from pip (no GStreamer): csi:// cameras are not available; v4l2://, rtsp:// and file:// are"
fi
install_edge_ad
link_cli
make_user_and_dirs
install_units

log "checking the installation (edge-ad doctor)"
if [[ ${DRY_RUN} -eq 0 ]]; then
    if [[ ${WITH_USER} -eq 1 ]] && command -v runuser >/dev/null 2>&1; then
        runuser -u "${SERVICE_USER}" -- "${VENV}/bin/edge-ad" doctor --data-dir "${DATA_DIR}" || true
    else
        "${VENV}/bin/edge-ad" doctor --data-dir "${DATA_DIR}" || true
    fi
else
    run "${VENV}/bin/edge-ad" doctor --data-dir "${DATA_DIR}"
fi

if [[ ${BACKEND} == tensorrt ]]; then
    ENGINE_STEP="build the TensorRT engine on this device:            sudo -u ${SERVICE_USER} edge-ad compile --bundle ${DATA_DIR}/bundle --precision best --calib ${DATA_DIR}/normals"
else
    ENGINE_STEP="no TensorRT engine: this install runs on ONNX Runtime (backend = \"${BACKEND}\", device = \"${DEVICE}\" in config.toml)"
fi
cat <<EOF

edge-ad is installed in ${VENV} (JetPack ${JETPACK}), and on PATH as ${BIN_LINK}.
Next steps (jetson/README.md explains each):
  1. copy or train a bundle into ${DATA_DIR}/bundle      (or install archives into a deploy folder: jetson/README.md, step 5)
  2. ${ENGINE_STEP}
  3. edit ${CONFIG_DIR}/config.toml (camera, broker) and ${CONFIG_DIR}/edge-ad.env (secrets)
  4. check:                                               sudo -u ${SERVICE_USER} edge-ad doctor --config ${CONFIG_DIR}/config.toml
  5. start:                                               sudo systemctl enable --now edge-ad
EOF
