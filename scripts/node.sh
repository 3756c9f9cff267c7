#!/usr/bin/env bash
# A real single-node Kubernetes cluster on this machine, for the cluster
# end-to-end suite (e2e/tests/cluster.rs) and for trying the chart as a user
# would: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and
# kube-proxy from binaries you give by path, with etcd, containerd, runc,
# the CNI plugins and a cluster DNS (dnsmasq, fed from the Services) from
# Debian's packages.
#
#   scripts/node.sh up --kube-bin DIR [--name NAME] [--nodes 1|2]   # prints the kubeconfig's path
#   scripts/node.sh exec [--name NAME] -- CMD [ARGS...]
#   scripts/node.sh down [--name NAME]
#
# The Kubernetes binaries are not built by anything in this repository: build
# them from the Kubernetes source of the version you want to run (v1.28 or
# later), e.g. `go build -tags providerless ./cmd/kubelet`, into DIR.
#
# Everything runs inside a network namespace of its own (`kanava-node-NAME`)
# and a mount namespace of its own: nothing changes the host's addresses,
# routes or firewall rules, and the node's /run, CNI directories, pod logs
# and network-namespace mounts are its own. The API server listens on the
# node's address 10.99.0.1:6443 inside that namespace, so commands that use
# the cluster run through `scripts/node.sh exec`, which also sets KUBECONFIG.
# With `--nodes 2` a second node (`kanava-node-NAME-2`, 10.99.0.2, pods in
# 10.244.1.0/24) joins, with its own network and mount namespaces,
# containerd, kubelet (pods under the cgroup /kanava-node-NAME-2) and
# kube-proxy, linked to the first by a veth pair: the cross-node paths.
# `down` stops every process and container of the nodes and removes their
# namespaces, cgroups and files. Needs root; images to run are imported with
# `scripts/node.sh exec -- ctr-import FILE.tar`.
set -euo pipefail
caller="$PWD"
cd "$(dirname "$0")/.."
repo="$PWD"

fail() { echo "kanava node: $*" >&2; exit 1; }
say() { echo "kanava node: $*" >&2; }

command="${1:-}"
[ -n "$command" ] && shift
name="one"
kube_bin=""
nodes=1
node=1
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --node) node="$2"; shift 2 ;;
    --kube-bin) kube_bin="$2"; shift 2 ;;
    --) shift; break ;;
    *) [ "$command" = "__run" ] && break; fail "unknown argument $1" ;;
  esac
done
[[ "$name" =~ ^[a-z0-9-]{1,20}$ ]] || fail "--name takes 1 to 20 of a-z, 0-9 and -"
[[ "$nodes" =~ ^[12]$ ]] || fail "--nodes takes 1 or 2"
state="/var/lib/kanava-node/$name"
api_ip="10.99.0.1"

# The names and places of node N (1: the control plane's node).
node_vars() {
  if [ "$1" = 1 ]; then
    netns="kanava-node-$name"; node_state="$state"; node_ip="10.99.0.1"
    node_name="kanava-node-$name"; pod_subnet="10.244.0.0/24"
  else
    netns="kanava-node-$name-$1"; node_state="$state/node-$1"; node_ip="10.99.0.$1"
    node_name="kanava-node-$name-$1"; pod_subnet="10.244.$(($1 - 1)).0/24"
  fi
  containerd_socket="$node_state/containerd.sock"
}
node_vars 1

in_node() {
  # The node's mount namespace is the one its init process (pid in
  # $node_state/init.pid) lives in; its network namespace is $netns.
  local init
  init="$(cat "$node_state/init.pid" 2>/dev/null)" || fail "no node $name is up"
  nsenter --target "$init" --mount --net --wd="$caller" -- "$@"
}

# Writes node N's CNI configuration, containerd's and the kubelet's.
node_files() {
  node_vars "$1"
  mkdir -p "$node_state"/{logs,kubelet,containerd,cni-bin,cni-conf,pod-logs,run}
  # The node's CNI plugins (Debian keeps them in /usr/lib/cni) and its
  # primary network: the bridge plugin with host-local addresses. With two
  # nodes, no masquerade: pods reach each other by their own addresses.
  cp /usr/lib/cni/* "$node_state/cni-bin/"
  local masquerade=true
  [ "$nodes" = 1 ] || masquerade=false
  cat > "$node_state/cni-conf/10-bridge.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "kanava-node", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": $masquerade,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$pod_subnet"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}
]}
EOF
  cat > "$node_state/containerd.toml" <<EOF
version = 2
root = "$node_state/containerd/root"
state = "$node_state/containerd/state"
[grpc]
  address = "$containerd_socket"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "kanava.local/pause:1"
  # Without CAP_SYS_RESOURCE a container's oom_score_adj cannot go below ours.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
EOF
  # A second kubelet keeps its pods under a cgroup of its own.
  local cgroup_root=""
  [ "$1" = 1 ] || cgroup_root="cgroupRoot: /$node_name"
  cat > "$node_state/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $state/pki/ca.crt}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
$cgroup_root
containerRuntimeEndpoint: unix://$containerd_socket
failSwapOn: false
clusterDNS: [$api_ip]
clusterDomain: cluster.local
resolvConf: $state/resolv.conf
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
serializeImagePulls: false
EOF
}

case "$command" in
up)
  [ "$(id -u)" -eq 0 ] || fail "must run as root"
  [ -n "$kube_bin" ] || fail "--kube-bin DIR is required (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy)"
  kube_bin="$(cd "$kube_bin" && pwd)"
  for binary in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
    [ -x "$kube_bin/$binary" ] || fail "$kube_bin/$binary is missing"
  done
  [ -e "$state/init.pid" ] && fail "node $name is already up (scripts/node.sh down --name $name)"
  packages=(etcd-server containerd runc containernetworking-plugins dnsmasq-base conntrack
            iptables iproute2 openssl kubernetes-client util-linux jq)
  missing=()
  for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    # kubectl may come from elsewhere than Debian's kubernetes-client.
    if command -v kubectl >/dev/null; then
      filtered=(); for p in "${missing[@]}"; do [ "$p" = kubernetes-client ] || filtered+=("$p"); done
      missing=("${filtered[@]}")
    fi
  fi
  if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  rm -rf "$state" && mkdir -p "$state"/{logs,pki,etcd,dns,run}
  echo "$kube_bin" > "$state/kube-bin"

  say "certificates"
  pki="$state/pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=kanava-node-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  issue() { # name, subject, extensions
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$pki/$1.key" -out "$pki/$1.csr" 2>/dev/null
    printf '%s\n' "$3" > "$pki/$1.ext"
    openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
      -days 30 -extfile "$pki/$1.ext" -out "$pki/$1.crt" 2>/dev/null
  }
  issue apiserver "/CN=kube-apiserver" \
    "subjectAltName=IP:10.96.0.1,IP:$api_ip,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  issue admin "/O=system:masters/CN=kanava-node-admin" "extendedKeyUsage=clientAuth"
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  kubeconfig="$state/admin.kubeconfig"
  cat > "$kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $node_name
  cluster:
    server: https://$api_ip:6443
    certificate-authority-data: $(base64 -w0 < "$pki/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(base64 -w0 < "$pki/admin.crt")
    client-key-data: $(base64 -w0 < "$pki/admin.key")
contexts:
- name: $node_name
  context: {cluster: $node_name, user: admin}
current-context: $node_name
EOF

  for n in $(seq 1 "$nodes"); do node_files "$n"; done
  node_vars 1
  echo "$nodes" > "$state/nodes"
  # The node's own resolver is the cluster DNS (nothing leaves the node).
  printf 'nameserver %s\nsearch cluster.local\n' "$api_ip" > "$state/resolv.conf"

  # A pause image of our own (the sandbox's first process only waits).
  say "the pause image"
  pause="$state/pause"
  mkdir -p "$pause/rootfs"
  printf '#include <signal.h>\n#include <unistd.h>\nstatic void quit(int s) { (void)s; _exit(0); }\nint main(void) { signal(SIGTERM, quit); signal(SIGINT, quit); for (;;) pause(); }\n' > "$pause/pause.c"
  gcc -static -Os -o "$pause/rootfs/pause" "$pause/pause.c"
  "$repo/scripts/image-archive.sh" kanava.local/pause:1 "$pause/rootfs" '{"Entrypoint": ["/pause"]}' "$state/pause.tar"

  say "network and mount namespaces"
  ip netns add "$netns"
  ip -n "$netns" link set lo up
  ip -n "$netns" link add kn0 type veth peer name kn1
  ip -n "$netns" addr add "$node_ip/24" dev kn0
  ip -n "$netns" link set kn0 up
  ip -n "$netns" route add default dev kn0
  if [ "$nodes" = 1 ]; then
    ip -n "$netns" link set kn1 up
  else
    # The second node on the other end of the link; each routes the
    # other's pods to it.
    node_vars 2
    ip netns add "$netns"
    ip -n "$netns" link set lo up
    ip -n "kanava-node-$name" link set kn1 netns "$netns"
    ip -n "$netns" addr add "$node_ip/24" dev kn1
    ip -n "$netns" link set kn1 up
    ip -n "$netns" route add default via "$api_ip"
    ip -n "kanava-node-$name" route add "$pod_subnet" via "$node_ip"
    for hierarchy in /sys/fs/cgroup/*/; do mkdir -p "$hierarchy$node_name"; done
    node_vars 1
  fi
  # Mount points for the node's own directories; those made here go at down.
  for dir in /opt/cni/bin /etc/cni/net.d /var/log/pods; do
    [ -d "$dir" ] && continue
    top="$dir"
    while [ ! -d "$(dirname "$top")" ]; do top="$(dirname "$top")"; done
    mkdir -p "$dir" && echo "$top" >> "$state/made-dirs"
  done
  # Each node's init: its own mount namespace inside its network namespace;
  # it starts the node's components and waits.
  for n in $(seq 1 "$nodes"); do
    node_vars "$n"
    setsid unshare --mount --propagation private -- nsenter --net="/run/netns/$netns" -- \
      "$repo/scripts/node.sh" __run --name "$name" --nodes "$nodes" --node "$n" \
      > "$node_state/logs/init.log" 2>&1 < /dev/null &
    deadline=$((SECONDS + 180))
    until [ -s "$node_state/ready" ]; do
      if [ $SECONDS -ge $deadline ] || ! kill -0 $! 2>/dev/null; then
        tail -n 30 "$node_state/logs/init.log" >&2 || true
        fail "node $node_name did not come up; logs in $node_state/logs (scripts/node.sh down --name $name)"
      fi
      sleep 1
    done
  done
  node_vars 1
  say "node $node_name is Ready ($(in_node env KUBECONFIG="$kubeconfig" kubectl version -o json | jq -r .serverVersion.gitVersion))"
  echo "$kubeconfig"
  ;;

__run)
  # Inside the node's namespaces. / is made shared again in this mount
  # namespace (the kubelet mounts volumes with propagation); nothing of it
  # reaches the host.
  node_vars "$node"
  echo $$ > "$node_state/init.pid"
  # A /sys of this network namespace (the bridge plugin reads it), with
  # the host's cgroup hierarchies moved over (the kubelet needs them);
  # done while every mount is private (a shared one cannot be moved).
  mkdir -p "$node_state/cgroup"
  mount --rbind /sys/fs/cgroup "$node_state/cgroup"
  mount -t sysfs sysfs /sys
  mount --move "$node_state/cgroup" /sys/fs/cgroup
  mount --make-rshared /
  mount -t tmpfs -o mode=0755 tmpfs /run
  mkdir -p /run/netns /run/kanava
  mount --bind "$node_state/cni-bin" /opt/cni/bin
  mount --bind "$node_state/cni-conf" /etc/cni/net.d
  mount --bind "$node_state/pod-logs" /var/log/pods
  mount --bind "$state/resolv.conf" /etc/resolv.conf
  kube_bin="$(cat "$state/kube-bin")"
  pki="$state/pki"
  kubeconfig="$state/admin.kubeconfig"
  export KUBECONFIG="$kubeconfig"
  start() { # name, command...
    local component="$1"; shift
    "$@" > "$node_state/logs/$component.log" 2>&1 &
    echo "$!" > "$node_state/run/$component.pid"
  }
  start_node() { # containerd, the kubelet and kube-proxy
    start containerd containerd --config "$node_state/containerd.toml"
    until ctr -a "$containerd_socket" version >/dev/null 2>&1; do sleep 0.5; done
    ctr -a "$containerd_socket" -n k8s.io images import "$state/pause.tar" >/dev/null
    start kubelet "$kube_bin/kubelet" --config "$node_state/kubelet.yaml" --kubeconfig "$kubeconfig" \
      --hostname-override "$node_name" --node-ip "$node_ip" --root-dir "$node_state/kubelet"
    start kube-proxy "$kube_bin/kube-proxy" --kubeconfig "$kubeconfig" \
      --hostname-override "$node_name" --cluster-cidr 10.244.0.0/16 --proxy-mode iptables \
      --conntrack-max-per-core 0
  }
  wait_ready() {
    until kubectl get node "$node_name" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -q True; do
      sleep 1
    done
    date +%s > "$node_state/ready"
  }
  if [ "$node" != 1 ]; then
    start_node
    wait_ready
    wait
    exit 0
  fi
  start etcd etcd --data-dir "$state/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380
  start kube-apiserver "$kube_bin/kube-apiserver" --etcd-servers http://127.0.0.1:2379 \
    --advertise-address "$node_ip" --bind-address 0.0.0.0 --secure-port 6443 \
    --service-cluster-ip-range 10.96.0.0/16 \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --authorization-mode Node,RBAC --allow-privileged=true \
    --kubelet-preferred-address-types InternalIP \
    --kubelet-client-certificate "$pki/admin.crt" --kubelet-client-key "$pki/admin.key"
  until kubectl get --raw /readyz >/dev/null 2>&1; do sleep 0.5; done
  start kube-controller-manager "$kube_bin/kube-controller-manager" --kubeconfig "$kubeconfig" \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --use-service-account-credentials=true --leader-elect=false
  start kube-scheduler "$kube_bin/kube-scheduler" --kubeconfig "$kubeconfig" --leader-elect=false
  start_node
  # The cluster DNS: dnsmasq on the node's address answers for every
  # Service (NAME.NAMESPACE.svc.cluster.local), from a file kept in step;
  # any other name under cluster.local does not exist (NXDOMAIN, so that
  # resolvers go on down their search list), and nothing is forwarded.
  start dnsmasq dnsmasq --keep-in-foreground --listen-address "$node_ip" --bind-interfaces \
    --no-resolv --no-hosts --hostsdir "$state/dns" --pid-file="$state/run/dnsmasq.real.pid" \
    --local=/cluster.local/
  (
    while true; do
      kubectl get services -A -o json 2>/dev/null | jq -r '.items[]
        | select(.spec.clusterIP != null and .spec.clusterIP != "None")
        | "\(.spec.clusterIP) \(.metadata.name).\(.metadata.namespace).svc.cluster.local"' \
        > "$state/dns-services.tmp" && ! cmp -s "$state/dns-services.tmp" "$state/dns/services" \
        && mv "$state/dns-services.tmp" "$state/dns/services"
      sleep 1
    done
  ) &
  echo "$!" > "$state/run/dns-feed.pid"
  wait_ready
  wait
  ;;

exec)
  [ $# -gt 0 ] || fail "usage: scripts/node.sh exec [--name NAME] -- CMD [ARGS...]"
  if [ "$1" = "ctr-import" ]; then
    shift
    for n in $(seq 1 "$(cat "$state/nodes" 2>/dev/null || echo 1)"); do
      node_vars "$n"
      for archive in "$@"; do
        in_node ctr -a "$containerd_socket" -n k8s.io images import "$archive"
      done
    done
    exit 0
  fi
  KUBECONFIG="$state/admin.kubeconfig" in_node "$@"
  ;;

down)
  [ "$(id -u)" -eq 0 ] || fail "must run as root"
  for n in $(seq "$(cat "$state/nodes" 2>/dev/null || echo 1)" -1 1); do
    node_vars "$n"
    if [ -e "$node_state/init.pid" ] && kill -0 "$(cat "$node_state/init.pid")" 2>/dev/null; then
      # Containers first (their shims outlive containerd), then the node.
      in_node bash -c "for task in \$(ctr -a '$containerd_socket' -n k8s.io tasks ls -q 2>/dev/null); do
          ctr -a '$containerd_socket' -n k8s.io tasks kill -s SIGKILL \$task 2>/dev/null || true; done" || true
      sleep 1
    fi
    # Every process whose network namespace is the node's: components,
    # shims, the init; containers' processes run in pods' namespaces and die
    # with their shims.
    if [ -e "/run/netns/$netns" ]; then
      for pid in $(ip netns pids "$netns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    fi
    for shim in $(pgrep -f "containerd-shim-runc-v2 .*-address $containerd_socket" 2>/dev/null); do
      kill -9 "$shim" 2>/dev/null || true
    done
    sleep 1
    # Pods' processes whose shim is gone: runc's state names them.
    if [ -d "$node_state/containerd/state" ]; then
      for pidfile in $(find "$node_state/containerd/state" -name init.pid 2>/dev/null); do
        kill -9 "$(cat "$pidfile")" 2>/dev/null || true
      done
    fi
    ip netns delete "$netns" 2>/dev/null || true
    # The kubelet's cgroups (cgroupfs driver), deepest first.
    cgroup_root=""
    [ "$n" = 1 ] || cgroup_root="$node_name/"
    for hierarchy in /sys/fs/cgroup/*/; do
      [ -d "$hierarchy${cgroup_root}kubepods" ] || continue
      find "$hierarchy${cgroup_root}kubepods" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
    for dir in /sys/fs/cgroup/*/${cgroup_root}kubepods; do
      [ -d "$dir" ] && say "cgroup $dir is still busy"
    done
    if [ -n "$cgroup_root" ]; then
      for hierarchy in /sys/fs/cgroup/*/; do
        [ -d "$hierarchy$node_name" ] && find "$hierarchy$node_name" -depth -type d -exec rmdir {} \; 2>/dev/null || true
      done
    fi
  done
  node_vars 1
  # The mounts the kubelet and containerd made lived in the node's mount
  # namespace and went with it; its files go now, and the empty mount
  # points `up` made.
  made="$(cat "$state/made-dirs" 2>/dev/null || true)"
  rm -rf "$state"
  for dir in $made; do find "$dir" -depth -type d -empty -delete 2>/dev/null || true; done
  rmdir /var/lib/kanava-node 2>/dev/null || true
  say "node $name removed"
  ;;

*)
  fail "usage: scripts/node.sh up --kube-bin DIR [--name NAME] | exec [--name NAME] -- CMD... | down [--name NAME]"
  ;;
esac
