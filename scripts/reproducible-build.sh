#!/usr/bin/env bash
# Check that the enclave binary builds reproducibly: build it twice, from two
# copies of the source tree in different directories (different path names
# and depths), each with its own empty Go build cache and temp directory,
# and compare the SHA-256 of the two binaries. Both builds run
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
# Exit 0 and print the digest when the two are identical; exit 1 and print
# both digests (and the first differing bytes) when they are not.
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
	local name=$1 src=$2
	local cache=$tmp/cache-$name
	mkdir -p "$cache/gocache" "$cache/tmp"
	log "build $name in $src (empty GOCACHE)"
	# A fresh build cache per build, so the second build cannot reuse the
	# first one's objects; the shared module cache holds sources only,
	# checked against go.sum. Other environment differences on purpose:
	# TMPDIR, umask, TZ, locale.
	(
		cd "$src"
		umask "$3"
		GOCACHE=$cache/gocache TMPDIR=$cache/tmp TZ=$4 LC_ALL=C \
			./scripts/build-enclave-binary.sh "$tmp/nitrosign-enclave.$name"
	)
}

log "source: $source_mode of $repo"
copy_tree "$src_a"
copy_tree "$src_b"
start=$SECONDS
build_one a "$src_a" 022 UTC
build_one b "$src_b" 077 Asia/Kolkata
log "two builds took $((SECONDS - start)) s"

sum_a=$(sha256sum "$tmp/nitrosign-enclave.a" | cut -d' ' -f1)
sum_b=$(sha256sum "$tmp/nitrosign-enclave.b" | cut -d' ' -f1)
size=$(stat -c %s "$tmp/nitrosign-enclave.a")
if [[ $sum_a != "$sum_b" ]]; then
	log "NOT reproducible:"
	log "  $sum_a  $src_a"
	log "  $sum_b  $src_b"
	cmp "$tmp/nitrosign-enclave.a" "$tmp/nitrosign-enclave.b" | head -5 >&2 || true
	[[ $keep == true ]] && log "binaries kept in $tmp"
	exit 1
fi
log "reproducible: both builds are $size bytes with SHA-256 $sum_a"
[[ $keep == true ]] && log "binaries kept in $tmp"
printf '%s  nitrosign-enclave\n' "$sum_a"
