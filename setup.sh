#!/usr/bin/env bash
# Creates .venv/ at the repository root and installs ActiveGuard into it.
#   ./setup.sh          the product: core, TorchServe serving, license server
#   ./setup.sh --dev    plus the test tools
# torch==2.13.0 goes in first: it is the CPU wheel on local disk, and anything unpinned
# would otherwise pull a multi-GB CUDA build. A second run skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")"

extras="[serving,license-server]"
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null || python_bin=python3
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($python_bin --version)"
  "$python_bin" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
# This machine's pip config names local index folders that may be absent; hide that noise only.
run_pip() { "${pip[@]}" "$@" 2> >(grep -v "is neither a file nor a directory" >&2); }

if ! .venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  echo "==> installing torch==2.13.0 (CPU)"
  run_pip install torch==2.13.0
fi

# Fashion-MNIST comes from Debian's package; without it the code falls back to 8x8 digits and warns.
fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fmnist" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "==> installing Debian package dataset-fashion-mnist"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "warning: dataset-fashion-mnist not installed; Fashion-MNIST tasks will use the 8x8 digits fallback" >&2
fi

stamp=".venv/.activeguard-installed$extras"
fingerprint="$(cat pyproject.toml setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$fingerprint" ]; then
  echo "==> installing activeguard$extras (editable)"
  run_pip install -e ".$extras"
  echo "$fingerprint" > "$stamp"
fi
echo "==> ready: .venv/bin/activeguard --help"
