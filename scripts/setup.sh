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
)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
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
