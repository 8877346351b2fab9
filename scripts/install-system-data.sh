#!/usr/bin/env bash
# Debian packages some tasks read or call: espeak-ng (SC-synthetic speech) and
# dataset-fashion-mnist (the Fashion-MNIST IDX files). Installs only what is missing; without
# root (or password-less sudo) it says what to install and exits 0: those tasks then report
# themselves unavailable (`diagssm data list`) and their tests are skipped with that reason.
set -euo pipefail
need=()
command -v espeak-ng >/dev/null || need+=(espeak-ng)
[ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo)
else
  echo "note: not installing ${need[*]} (needs root): run 'apt-get install ${need[*]}'" >&2
  exit 0
fi
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get install -y -q "${need[@]}" >/dev/null \
  || { "${sudo[@]}" apt-get update -q >/dev/null && "${sudo[@]}" apt-get install -y -q "${need[@]}" >/dev/null; }
