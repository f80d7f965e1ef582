#!/usr/bin/env bash
# Installs the real genomes used by experiments/dna (Debian bookworm packages; nothing is committed to the repo).
#   ragout-examples   16 complete bacterial genomes, 4 species (E. coli, H. pylori, S. aureus, V. cholerae)
# (sibelia-examples, the other package /work/shared/data.md lists, repeats strains of two of these species in
# one multi-genome file; the experiment does not use it.)
# Idempotent: does nothing when the files are already there. Needs root (or run the dpkg-deb route in
# /work/shared/data.md by hand).
set -euo pipefail
want=(ragout-examples)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "dna data: already installed (${want[*]})"
else
  if [ "$(id -u)" -ne 0 ]; then echo "dna data: run as root to apt-get install ${missing[*]}" >&2; exit 1; fi
  # apt-get update only when the package lists are missing or older than a day
  if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -1)" ]; then
    apt-get update -qq
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
ls /usr/share/doc/ragout/examples/*/references/*.fasta.gz | wc -l | xargs echo "dna data: reference genomes:"
