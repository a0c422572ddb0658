# Sourced by the scripts that install what is missing (Debian 12, as root).
# dspex_packages: what the project needs to build and test.
# ensure_packages NAME PACKAGE...: installs the packages not yet installed;
# without root it names them and fails (NAME prefixes its messages).

dspex_packages=(g++ cmake make python3 ccache libcaf-dev libboost-dev libboost-filesystem-dev
                libspdlog-dev libfmt-dev nlohmann-json3-dev doctest-dev python3-prometheus-client
                openssl)  # openssl: the node TLS tests make their certificates with it

ensure_packages() {
  local name=$1
  shift
  local missing=() p
  for p in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  ((${#missing[@]})) || return 0
  echo "$name: installing ${missing[*]}" >&2
  if [[ $(id -u) -ne 0 ]]; then
    echo "$name: missing packages and not root; install them with: apt-get install ${missing[*]}" >&2
    return 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
