#!/usr/bin/env bash
# Installs the real audio used by experiments/audio (Debian bookworm packages; nothing is committed to the repo).
#   asterisk-core-sounds-en-wav  568 prompts, one speaker, 16-bit 8 kHz mono (25 min)
#   asterisk-moh-opsound-wav     music on hold, 16-bit 8 kHz mono (18 min)
#   flite, espeak-ng             offline speech synthesis for the spoken-digit set (SC09-like, 10 classes)
# Idempotent: does nothing when the packages are already installed. Needs root.
set -euo pipefail
want=(asterisk-core-sounds-en-wav asterisk-moh-opsound-wav flite espeak-ng)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "audio data: already installed (${want[*]})"
else
  if [ "$(id -u)" -ne 0 ]; then echo "audio data: run as root to apt-get install ${missing[*]}" >&2; exit 1; fi
  if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -1)" ]; then
    apt-get update -qq
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
find /usr/share/asterisk -name '*.wav' | wc -l | xargs echo "audio data: wav files:"
