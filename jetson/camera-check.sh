#!/usr/bin/env bash
# Check a camera outside edge-ad, with GStreamer, before pointing the service at it.
#
#   jetson/camera-check.sh list              USB / V4L2 devices and their formats; the Argus daemon
#   jetson/camera-check.sh csi [SENSOR]      grab 60 frames from a CSI camera (nvarguscamerasrc)
#   jetson/camera-check.sh usb [DEVICE]      grab 60 frames from a USB camera (v4l2src)
#   jetson/camera-check.sh snap csi|usb [SENSOR|DEVICE] [FILE]   save one JPEG (default snap.jpg)
#
# Environment: WIDTH, HEIGHT, FPS (default 1920x1080 at 30 for CSI, 1280x720 at 30 for USB).
set -Eeuo pipefail

die() { printf 'camera-check: %s\n' "$*" >&2; exit 1; }
# The comment at the top of this file, without its '#', up to the first line that is not a comment
help() { awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found (sudo apt install $2)"; }

list() {
    if command -v v4l2-ctl >/dev/null 2>&1; then
        v4l2-ctl --list-devices || true
        local dev
        for dev in /dev/video*; do
            [[ -e ${dev} ]] || continue
            printf '\n== %s\n' "${dev}"
            v4l2-ctl -d "${dev}" --list-formats-ext 2>/dev/null | sed -n '1,40p' || true
        done
    else
        ls -l /dev/video* 2>/dev/null || echo "no /dev/video* devices"
        echo "(sudo apt install v4l-utils for formats and controls)"
    fi
    if command -v systemctl >/dev/null 2>&1 && systemctl list-unit-files nvargus-daemon.service >/dev/null 2>&1; then
        printf '\nnvargus-daemon: %s\n' "$(systemctl is-active nvargus-daemon 2>/dev/null || true)"
    fi
}

# GStreamer source for N frames of a CSI sensor (Argus)
csi_source() {
    local sensor=$1 n=$2 w=${WIDTH:-1920} h=${HEIGHT:-1080} fps=${FPS:-30}
    printf 'nvarguscamerasrc sensor-id=%s num-buffers=%s ! video/x-raw(memory:NVMM),width=%s,height=%s,framerate=%s/1,format=NV12 ! nvvidconv' \
        "${sensor}" "${n}" "${w}" "${h}" "${fps}"
}

# GStreamer source for N frames of a USB camera delivering MJPG (most UVC cameras at 720p and up)
usb_source() {
    local dev=$1 n=$2 w=${WIDTH:-1280} h=${HEIGHT:-720} fps=${FPS:-30}
    [[ -e ${dev} ]] || die "${dev} does not exist (camera-check.sh list)"
    [[ -r ${dev} && -w ${dev} ]] || die "no access to ${dev}: add yourself to the video group (sudo usermod -aG video \$USER)"
    printf 'v4l2src device=%s num-buffers=%s ! image/jpeg,width=%s,height=%s,framerate=%s/1 ! jpegdec ! videoconvert' \
        "${dev}" "${n}" "${w}" "${h}" "${fps}"
}

grab() {
    local src=$1
    need gst-launch-1.0 gstreamer1.0-tools
    echo "gst-launch-1.0 ${src} ! fpsdisplaysink video-sink=fakesink"
    local log rc=0
    log=$(mktemp)
    # shellcheck disable=SC2086  # the pipeline is split into gst-launch arguments on purpose
    gst-launch-1.0 -e ${src} ! fpsdisplaysink video-sink=fakesink text-overlay=false -v >"${log}" 2>&1 || rc=$?
    grep -E 'rendered|ERROR|WARNING|Setting pipeline' "${log}" | tail -n 5 || true
    rm -f "${log}"
    [[ ${rc} -eq 0 ]] || die "capture failed (gst-launch-1.0 exit ${rc}): no frames from the camera, see the errors above"
}

# Save the last of 30 frames (auto exposure settles over the first ones) as a JPEG
snap() {
    local src=$1 out=$2
    need gst-launch-1.0 gstreamer1.0-tools
    # shellcheck disable=SC2086
    gst-launch-1.0 -e ${src} ! videoconvert ! jpegenc ! multifilesink location="${out}" \
        || die "capture failed (gst-launch-1.0 exit $?): ${out} not written, see the errors above"
    echo "saved ${out}"
}

cmd=${1:-list}
src=""
case "${cmd}" in
    list) list ;;
    csi) src=$(csi_source "${2:-0}" 60); grab "${src}" ;;
    usb) src=$(usb_source "${2:-/dev/video0}" 60); grab "${src}" ;;
    snap)
        case "${2:-csi}" in
            csi) src=$(csi_source "${3:-0}" 30) ;;
            usb) src=$(usb_source "${3:-/dev/video0}" 30) ;;
            *) die "snap: expected csi or usb" ;;
        esac
        snap "${src}" "${4:-snap.jpg}" ;;
    -h|--help) help ;;
    *) die "unknown command '${cmd}' (list, csi, usb, snap)" ;;
esac
