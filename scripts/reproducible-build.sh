#!/usr/bin/env bash
# Check that the enclave binary builds reproducibly, for both architectures
# an EIF can have (amd64: x86 parents; arm64: Graviton): build each twice,
# from two copies of the source tree in different directories (different
# path names and depths), each with its own empty Go build cache and temp
# directory, and compare the SHA-256 of the two binaries. Every build runs
# scripts/build-enclave-binary.sh, the very build Dockerfile.enclave runs.
#
# Usage: scripts/reproducible-build.sh [--keep]
#   --keep   leave the temp directory (and both binaries) in place
#
# Environment:
#   NITROSIGN_REPRO_SOURCE  worktree (default): the files git tracks plus
#                           untracked, not ignored ones, as they are now;
#                           head: two `git clone`s of HEAD (what CI builds)
#
# Exit 0 and print one digest per architecture when each pair is identical;
# exit 1 and print both digests (and the first differing bytes) of a pair
# that is not.
set -euo pipefail

log() { printf 'reproducible-build: %s\n' "$*" >&2; }
die() {
	printf 'reproducible-build: error: %s\n' "$*" >&2
	exit 1
}

keep=false
for arg in "$@"; do
	case $arg in
	--keep) keep=true ;;
	-h | --help)
		sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*) die "unknown argument '$arg' (see --help)" ;;
	esac
done

for tool in go git sha256sum cmp; do
	command -v "$tool" >/dev/null 2>&1 || die "$tool not found in PATH"
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source_mode=${NITROSIGN_REPRO_SOURCE:-worktree}
case $source_mode in
worktree | head) ;;
*) die "NITROSIGN_REPRO_SOURCE must be worktree or head, not '$source_mode'" ;;
esac

tmp=$(mktemp -d "${TMPDIR:-/tmp}/nitrosign-repro.XXXXXX")
if [[ $keep == false ]]; then
	# Go's module cache is read-only; the build caches are not, but make
	# sure everything can be removed.
	trap 'chmod -R u+w "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT
fi

# Two source locations that differ in name and depth.
src_a=$tmp/a/nitrosign
src_b=$tmp/second-clone/deeper/path/src
mkdir -p "$(dirname "$src_a")" "$(dirname "$src_b")"

copy_tree() {
	local dst=$1
	case $source_mode in
	head)
		git clone --quiet --no-hardlinks "$repo" "$dst"
		;;
	worktree)
		mkdir -p "$dst"
		# Tracked and untracked-but-not-ignored files that exist now.
		(cd "$repo" && git ls-files -z --cached --others --exclude-standard) |
			(cd "$repo" && while IFS= read -r -d '' f; do
				[[ -e $f ]] && printf '%s\0' "$f"
			done) |
			(cd "$repo" && tar --null -T - -cf -) | (cd "$dst" && tar -xf -)
		;;
	esac
}

build_one() {
	local name=$1 src=$2 arch=$5
	local cache=$tmp/cache-$name-$arch
	mkdir -p "$cache/gocache" "$cache/tmp"
	log "build $name for $arch in $src (empty GOCACHE)"
	# A fresh build cache per build, so the second build cannot reuse the
	# first one's objects; the shared module cache holds sources only,
	# checked against go.sum. Other environment differences on purpose:
	# TMPDIR, umask, TZ, locale.
	(
		cd "$src"
		umask "$3"
		GOCACHE=$cache/gocache TMPDIR=$cache/tmp TZ=$4 LC_ALL=C \
			./scripts/build-enclave-binary.sh "$tmp/nitrosign-enclave.$arch.$name" "$arch"
	)
}

log "source: $source_mode of $repo"
copy_tree "$src_a"
copy_tree "$src_b"
sums=()
for arch in amd64 arm64; do
	start=$SECONDS
	build_one a "$src_a" 022 UTC "$arch"
	build_one b "$src_b" 077 Asia/Kolkata "$arch"
	log "two $arch builds took $((SECONDS - start)) s"
	bin_a=$tmp/nitrosign-enclave.$arch.a
	bin_b=$tmp/nitrosign-enclave.$arch.b
	sum_a=$(sha256sum "$bin_a" | cut -d' ' -f1)
	sum_b=$(sha256sum "$bin_b" | cut -d' ' -f1)
	if [[ $sum_a != "$sum_b" ]]; then
		log "NOT reproducible for $arch:"
		log "  $sum_a  $src_a"
		log "  $sum_b  $src_b"
		cmp "$bin_a" "$bin_b" | head -5 >&2 || true
		[[ $keep == true ]] && log "binaries kept in $tmp"
		exit 1
	fi
	log "reproducible for $arch: both builds are $(stat -c %s "$bin_a") bytes with SHA-256 $sum_a"
	sums+=("$sum_a  nitrosign-enclave ($arch)")
done
[[ $keep == true ]] && log "binaries kept in $tmp"
printf '%s\n' "${sums[@]}"
