#!/usr/bin/env bash
# Makes a `docker save` archive of one image from a root file system, with
# no container engine: one layer, a config, a manifest naming the tag.
# `docker load`, `kind load image-archive` and `ctr images import` take it.
#
#   scripts/image-archive.sh REFERENCE ROOTFS CONFIG_JSON OUTPUT.tar
#
# CONFIG_JSON is the image's `config` object (Entrypoint, Env, User,
# ExposedPorts, ...); PATH is added to its Env when it has none.
set -euo pipefail
[ $# -eq 4 ] || { echo "usage: $0 REFERENCE ROOTFS CONFIG_JSON OUTPUT.tar" >&2; exit 2; }
reference="$1" root="$2" config="$3" output="$4"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
tar --create --file "$dir/layer.tar" --directory "$root" --numeric-owner \
  --sort=name --mtime='2024-01-01 00:00:00' .
layer_sha="$(sha256sum "$dir/layer.tar" | cut -d' ' -f1)"
mkdir "$dir/$layer_sha"
mv "$dir/layer.tar" "$dir/$layer_sha/layer.tar"
jq -n --argjson config "$config" --arg layer "sha256:$layer_sha" --arg reference "$reference" '{
    architecture: "amd64", os: "linux",
    created: "2024-01-01T00:00:00Z",
    config: ({WorkingDir: "/"} + $config
      | .Env = (if any(.Env[]?; startswith("PATH=")) then .Env
                else ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + (.Env // []) end)),
    rootfs: {type: "layers", diff_ids: [$layer]},
    history: [{created: "2024-01-01T00:00:00Z", created_by: ("scripts/image-archive.sh " + $reference)}]
  }' > "$dir/config.json"
config_sha="$(sha256sum "$dir/config.json" | cut -d' ' -f1)"
mv "$dir/config.json" "$dir/$config_sha.json"
jq -n --arg config "$config_sha.json" --arg reference "$reference" --arg layer "$layer_sha/layer.tar" \
  '[{Config: $config, RepoTags: [$reference], Layers: [$layer]}]' > "$dir/manifest.json"
mkdir -p "$(dirname "$output")"
tar --create --file "$output" --directory "$dir" --sort=name --mtime='2024-01-01 00:00:00' \
  manifest.json "$config_sha.json" "$layer_sha"
