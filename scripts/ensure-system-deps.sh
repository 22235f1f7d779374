#!/usr/bin/env bash
# Debian packages the test suite needs, installed from Debian's own archive (never a
# browser build downloaded by a tool): chromium for the Playwright browser test,
# espeak-ng to synthesise speech for the audio-file and telephony tests, PortAudio with
# PulseAudio (a private daemon with null devices, no sound card) for the microphone recipe's
# real-PortAudio test. Idempotent; `make install`
# runs it. Exits non-zero when they cannot be had: the tests fail, never skip.
set -euo pipefail
PACKAGES=(chromium espeak-ng libportaudio2 libasound2-plugins pulseaudio pulseaudio-utils)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages present: ${PACKAGES[*]}"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing Debian packages (${missing[*]}) and no apt-get to install them" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "installing ${missing[*]} with apt-get"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
