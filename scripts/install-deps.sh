#!/usr/bin/env bash
# Installs the system packages Kiln needs on Debian 12, idempotently, at pinned versions whose
# .deb SHA256 (as published in the signed archive index) must match the pins below.
# Usage: scripts/install-deps.sh [--check]   (--check only reports what is missing)
set -euo pipefail

# package      version                    sha256 of the .deb
PINS="
runc         1.1.5+ds1-1+deb12u1        a00351f8c0318de0b424ecf5cd0fdb69880a89f3511cae4f6fff7de3e57881c5
debootstrap  1.0.128+nmu2+deb12u2       63f354316e9bbe747b143b7b0d83e5f237c90314a17734fba9ff202c2ef02760
mmdebstrap   1.3.5-7                    0ecb8da772c8e5b7f73b59cb6d1f02d789f8bcd9a6b5f19ed548fe12c26a76ca
iproute2     6.1.0-3                    1204b29e916e836267096d0b9d778106752f821ebde0d281539008b4386d9070
nftables     1.0.6-2+deb12u2            966ff20ce58c17163a771c02ddbca264291408f94c512bd85dd18da0ebdbe88c
btrfs-progs  6.2-1+deb12u2              8b9f4223957c327ea355c66876014f8a0ba6c74964c237266442fffa02fbf62e
runsc        0.0~20221219.0-2+b3        7183537aca11632026e71d4b2140f463c8e9a433e6cf8ea81e73f82710aabcd8
ansible-core 2.14.18-0+deb12u2          5f80e76b962daae74535ca5a2b910678acfd9ca2d902d2a94127a59e158f7a77
ansible      7.7.0+dfsg-3+deb12u1       625d3724fe2e75bfcdf8710a1549af473163cc5971350ac5d785c6ad1dec4af3
openssh-client 1:9.2p1-2+deb12u10       42c250b8b9110382488c53c066a960bc564ddac2cb9e449f47b6cdbb5fc1cb60
git          1:2.39.5-0+deb12u3         637a85ddd6247fab13bdd0592f2f39aff04ce4dbf0655d3ab553ac359a38ce6f
"
# mmdebstrap bootstraps the Debian base layer (debootstrap is the selectable alternative and the
# benchmark's baseline). Tools that come with every Debian system but must be there: losetup and mount (util-linux /
# mount). btrfs-progs (mkfs.btrfs) formats the disk pool that holds the writable layers.
# runsc (gVisor) is the optional `kiln up --runtime runsc`; the test suite runs it too.
# ansible-core runs the template roles; ansible brings the community.general collection, whose
# `chroot` connection plugin builds each role layer (ansible-core alone has no chroot connection).
# openssh-client (ssh, scp, sftp) is what the tests of the SSH front door connect with.
# git fetches the git sources of knowledge indexes (the server runs it); its `git daemon` is
# the real git server the tests of git sources fetch from.
BASE_TOOLS="losetup mount"

check_only=0
[ "${1:-}" = "--check" ] && check_only=1

if [ "$(id -u)" != 0 ]; then
  echo "install-deps: must run as root (it installs Debian packages)" >&2
  exit 1
fi

missing=()
while read -r pkg ver sha; do
  [ -n "$pkg" ] || continue
  have=$(dpkg-query -W -f='${Status} ${Version}' "$pkg" 2>/dev/null || true)
  if [ "$have" = "install ok installed $ver" ]; then
    continue
  fi
  missing+=("$pkg $ver $sha")
done <<< "$PINS"

for t in $BASE_TOOLS; do
  command -v "$t" >/dev/null 2>&1 || PATH="$PATH:/sbin:/usr/sbin" command -v "$t" >/dev/null 2>&1 || {
    echo "install-deps: $t is missing (hint: apt-get install mount util-linux)" >&2
    exit 1
  }
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all pinned packages present"
  exit 0
fi
if [ "$check_only" = 1 ]; then
  printf 'install-deps: missing %s\n' "${missing[@]}"
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
args=()
for m in "${missing[@]}"; do
  read -r pkg ver sha <<< "$m"
  got=$(apt-cache show "$pkg=$ver" 2>/dev/null | awk '/^SHA256:/{print $2; exit}')
  if [ -z "$got" ]; then
    echo "install-deps: $pkg $ver is not offered by the configured apt sources (hint: enable Debian 12 bookworm main)" >&2
    exit 1
  fi
  if [ "$got" != "$sha" ]; then
    echo "install-deps: $pkg $ver has SHA256 $got in the archive index, expected $sha; refusing to install" >&2
    exit 1
  fi
  args+=("$pkg=$ver")
done
apt-get install -y -qq --no-install-recommends "${args[@]}"
echo "install-deps: installed ${args[*]}"
