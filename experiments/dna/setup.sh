#!/usr/bin/env bash
# Installs the real genomes used by experiments/dna (Debian bookworm packages; nothing is committed to the repo).
#   ragout-examples   16 complete bacterial genomes, 4 species (E. coli, H. pylori, S. aureus, V. cholerae)
# (sibelia-examples, another Debian package of bacterial genomes, repeats strains of two of these species in one
# multi-genome file; the experiment does not use it.)
# Idempotent: does nothing when the files are already there. Needs root; without it: `apt-get download
# ragout-examples && dpkg-deb -x ragout-examples_*.deb DIR`, then --root DIR/usr/share/doc/ragout/examples.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../_common.sh"
apt_install "dna data" ragout-examples
ls /usr/share/doc/ragout/examples/*/references/*.fasta.gz | wc -l | xargs echo "dna data: reference genomes:"
