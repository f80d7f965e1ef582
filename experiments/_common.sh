# The setup step the experiments share, for their setup.sh to source: Debian packages installed once.
#   apt_install LABEL [APT-GET OPTION ...] PACKAGE ...
# Idempotent: does nothing when every package is installed. Needs root to install; runs `apt-get update` only
# when the package lists are missing or older than a day.
apt_install() {
  local label=$1; shift
  local opts=() want=() missing=() p
  for p in "$@"; do
    if [[ $p == -* ]]; then opts+=("$p"); else want+=("$p"); fi
  done
  for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "$label: already installed (${want[*]})"
    return 0
  fi
  if [ "$(id -u)" -ne 0 ]; then echo "$label: run as root to apt-get install ${missing[*]}" >&2; return 1; fi
  if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -1)" ]; then
    apt-get update -qq
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${opts[@]+"${opts[@]}"} "${missing[@]}"
}
