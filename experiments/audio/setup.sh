#!/usr/bin/env bash
# Installs the real audio used by experiments/audio (Debian bookworm packages; nothing is committed to the repo).
#   asterisk-core-sounds-en-wav  568 prompts, one speaker, 16-bit 8 kHz mono (25 min)
#   asterisk-moh-opsound-wav     music on hold, 16-bit 8 kHz mono (18 min)
#   flite, espeak-ng             offline speech synthesis for the spoken-digit set (SC09-like, 10 classes)
# Idempotent: does nothing when the packages are already installed. Needs root.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../_common.sh"
apt_install "audio data" --no-install-recommends asterisk-core-sounds-en-wav asterisk-moh-opsound-wav flite espeak-ng
find /usr/share/asterisk -name '*.wav' | wc -l | xargs echo "audio data: wav files:"
