#!/usr/bin/env bash
# Builds Kanava's three images as archives, on this machine, with no
# container engine and no registry:
#
#   target/images/kanava-control-plane.tar
#   target/images/kanava-ztunnel.tar
#   target/images/kanava-cni-install.tar
#
# Each is a `docker save` archive of one image, tagged
# ${KANAVA_IMAGE_REGISTRY:-docker.io/kanava}/kanava-NAME:${KANAVA_IMAGE_TAG:-0.1.0}
# (the chart's default image names), which all of these accept:
#
#   docker load -i target/images/kanava-ztunnel.tar
#   kind load image-archive target/images/kanava-ztunnel.tar
#   ctr -n k8s.io images import target/images/kanava-ztunnel.tar
#
# Equivalent to deploy/docker/Dockerfile: the same release binaries at the
# same paths, the same entrypoints, users, environment and ports, all read
# from deploy/docker/images.json (a test, deploy/tests/images.rs, checks the
# Dockerfile says the same), and the
# same bases: the ztunnel on a minimal Debian 12 with iptables and iproute2
# (debootstrap from Debian's archive instead of bookworm-slim), the control
# plane on Debian 12's C library and nothing else (as distroless/cc), the
# installer on nothing (as distroless/static). kanava-cni runs on the host,
# whatever its C library: it is linked statically (glibc here, with
# crt-static; musl in the Dockerfile).
#
# Needs: root (debootstrap), Debian 12, a Rust toolchain. Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "kanava images: $*" >&2; exit 1; }
say() { echo "kanava images: $*" >&2; }

[ "$(id -u)" -eq 0 ] || fail "must run as root (debootstrap builds the ztunnel's root file system)"
registry="${KANAVA_IMAGE_REGISTRY:-docker.io/kanava}"
tag="${KANAVA_IMAGE_TAG:-0.1.0}"
out="$PWD/target/images"
work="$out/work"
mkdir -p "$out" "$work"

missing=()
for tool in debootstrap file sha256sum jq; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing debootstrap file jq"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap file jq coreutils >/dev/null
fi

host_target="$(rustc -vV | sed -n 's/^host: //p')"
say "building the release binaries"
cargo build --release --locked -p kanava-control-plane -p kanava-ztunnel --bins
cargo build --release --locked -p kanava-lab --bin labapp
# Statically linked: only for the target given, so build scripts and
# procedural macros stay dynamic.
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked -p kanava-cni --bins --target "$host_target"
bin="$PWD/target/release"
static_bin="$PWD/target/$host_target/release"
for program in kanava-cni kanava-cni-install; do
  file -L "$static_bin/$program" | grep -Eq "statically linked|static-pie linked" \
    || fail "$static_bin/$program is not statically linked: $(file -L "$static_bin/$program")"
done

# A user and group table with root and nonroot (65532), as distroless has.
write_users() {
  mkdir -p "$1/etc"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$1/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' > "$1/etc/group"
  mkdir -p "$1/tmp" "$1/home/nonroot"
  chmod 1777 "$1/tmp"
  chown 65532:65532 "$1/home/nonroot"
}

# Every shared library a binary loads, copied to the same path.
copy_libraries() {
  local root="$1" binary="$2" library
  for library in $(ldd "$binary" | grep -o '/[^ ]*' | sort -u); do
    mkdir -p "$root$(dirname "$library")"
    cp -L "$library" "$root$library"
  done
}

# One image archive from a root file system, with the entrypoint,
# environment, user and ports of deploy/docker/images.json.
archive() {
  local name="$1" root="$2" config
  config="$(jq -c --arg name "$name" '.[$name] | {
      User: .user, Entrypoint: .entrypoint,
      Env: (["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + .env),
      ExposedPorts: (.ports | map({key: "\(.)/tcp", value: {}}) | from_entries)
    }' deploy/docker/images.json)"
  scripts/image-archive.sh "$registry/$name:$tag" "$root" "$config" "$out/$name.tar"
  say "$out/$name.tar: $registry/$name:$tag"
}

# The binaries of an image, at /usr/local/bin as in the Dockerfile.
install_binaries() {
  local name="$1" root="$2" from="$3" program
  mkdir -p "$root/usr/local/bin"
  for program in $(jq -r --arg name "$name" '.[$name].binaries[]' deploy/docker/images.json); do
    install -m 0755 --strip "$from/$program" "$root/usr/local/bin/"
  done
}

# The control plane: its binary, the C library it links, users, CA roots.
root="$work/control-plane"
rm -rf "$root" && mkdir -p "$root/etc/ssl/certs"
install_binaries kanava-control-plane "$root" "$bin"
copy_libraries "$root" "$bin/kanava-control-plane"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
write_users "$root"
archive kanava-control-plane "$root"

# The ztunnel: a minimal Debian 12 with iptables and iproute2 (made once,
# kept between runs), and its binary.
base="$work/ztunnel-base.tar"
if ! [ -s "$base" ]; then
  say "making a minimal Debian 12 with iptables and iproute2 (debootstrap, once)"
  staging="$work/ztunnel-base"
  rm -rf "$staging"
  debootstrap --variant=minbase --include=iptables,iproute2 bookworm "$staging" \
    http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
    || fail "debootstrap failed; see $work/debootstrap.log"
  rm -rf "$staging"/var/lib/apt/lists/* "$staging"/var/cache/apt/*.bin "$staging"/var/cache/apt/archives/*.deb
  tar --create --file "$base" --directory "$staging" --numeric-owner .
  rm -rf "$staging"
fi
root="$work/ztunnel"
rm -rf "$root" && mkdir -p "$root"
tar --extract --file "$base" --directory "$root" --numeric-owner
# debootstrap copies this machine's resolver and name: not the image's.
: > "$root/etc/resolv.conf" && echo localhost > "$root/etc/hostname"
install_binaries kanava-ztunnel "$root" "$bin"
archive kanava-ztunnel "$root"

# The installer: two static binaries, users.
root="$work/cni-install"
rm -rf "$root" && mkdir -p "$root"
install_binaries kanava-cni-install "$root" "$static_bin"
write_users "$root"
archive kanava-cni-install "$root"

# The probe and test workload of `kanava verify` and the cluster suite: labapp on the same minimal
# Debian, which also brings bash for clients (/dev/tcp).
root="$work/testapp"
rm -rf "$root" && mkdir -p "$root"
tar --extract --file "$base" --directory "$root" --numeric-owner
: > "$root/etc/resolv.conf" && echo localhost > "$root/etc/hostname"
install -m 0755 --strip "$bin/labapp" "$root/usr/local/bin/"
scripts/image-archive.sh "$registry/kanava-testapp:$tag" "$root" \
  '{"Entrypoint": ["/usr/local/bin/labapp"]}' "$out/kanava-testapp.tar"
say "$out/kanava-testapp.tar: $registry/kanava-testapp:$tag"

rm -rf "$work/control-plane" "$work/ztunnel" "$work/cni-install" "$work/testapp"
say "done: $(ls "$out"/*.tar | tr '\n' ' ')"
