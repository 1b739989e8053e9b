#!/usr/bin/env bash
# Run a command inside a throwaway qemu micro-VM (TCG) whose kernel has
# AF_VSOCK loopback (vsock_loopback, CID 1), for machines whose own kernel
# lacks CONFIG_VSOCKETS_LOOPBACK.
#
# Usage: scripts/vm/run.sh [--timeout SECONDS] [--mem MB] [--cpus N]
#                          [--env NAME=VALUE]... --bundle DIR -- CMD [ARGS...]
#
# The contents of DIR (static binaries: build with CGO_ENABLED=0) are copied to
# /bundle in the VM; CMD runs there with cwd=/bundle, PATH=/bundle:..., HOME
# and TMPDIR=/tmp, and the --env variables exported. The VM console is
# streamed to stdout; the script exits with CMD's exit status, 124 on timeout,
# 125 if the VM failed before reporting a status.
#
# The Debian cloud kernel (the package linux-image-cloud-amd64 depends on) is
# downloaded once with apt-get and its vmlinuz plus the vsock modules are
# cached in ${NITROSIGN_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nitrosign/vm},
# one directory per kernel package version. Environment:
#   NITROSIGN_VM_CACHE       cache directory (see above)
#   NITROSIGN_VM_KERNEL_PKG  pin the kernel package (default: resolved from
#                            linux-image-cloud-amd64)
#   NITROSIGN_VM_QEMU_ARGS   extra qemu arguments (word-split)
set -euo pipefail

prog=scripts/vm/run.sh
log() { printf 'vm: %s\n' "$*" >&2; }
die() {
	printf 'vm: error: %s\n' "$*" >&2
	exit 125
}
usage() {
	cat >&2 <<EOF
usage: $prog [--timeout SECONDS] [--mem MB] [--cpus N] [--env NAME=VALUE]...
       --bundle DIR -- CMD [ARGS...]
defaults: --timeout 1500 --mem 2048 --cpus 2
EOF
	exit 2
}

timeout_s=1500
mem=2048
cpus=2
bundle=
envs=()
while (($# > 0)); do
	case $1 in
	--timeout) timeout_s=${2:?--timeout needs a value}; shift 2 ;;
	--timeout=*) timeout_s=${1#*=}; shift ;;
	--mem) mem=${2:?--mem needs a value}; shift 2 ;;
	--mem=*) mem=${1#*=}; shift ;;
	--cpus) cpus=${2:?--cpus needs a value}; shift 2 ;;
	--cpus=*) cpus=${1#*=}; shift ;;
	--bundle) bundle=${2:?--bundle needs a value}; shift 2 ;;
	--bundle=*) bundle=${1#*=}; shift ;;
	--env) envs+=("${2:?--env needs NAME=VALUE}"); shift 2 ;;
	--env=*) envs+=("${1#*=}"); shift ;;
	-h | --help) usage ;;
	--) shift; break ;;
	*) printf 'vm: unknown argument: %s\n' "$1" >&2; usage ;;
	esac
done
(($# > 0)) || { printf 'vm: missing -- CMD\n' >&2; usage; }
[[ -n $bundle ]] || { printf 'vm: missing --bundle DIR\n' >&2; usage; }
[[ -d $bundle ]] || die "bundle directory $bundle does not exist"
for v in "$timeout_s" "$mem" "$cpus"; do
	[[ $v =~ ^[1-9][0-9]*$ ]] || die "not a positive integer: $v"
done
for e in "${envs[@]}"; do
	[[ $e =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants NAME=VALUE, got: $e"
done

cache=${NITROSIGN_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nitrosign/vm}
meta_pkg=linux-image-cloud-amd64
is_root=false
[[ $(id -u) == 0 ]] && is_root=true

tmp=$(mktemp -d "${TMPDIR:-/tmp}/nitrosign-vm.XXXXXX")
vm_pid=
fetch_work=
# shellcheck disable=SC2317 # invoked by trap
cleanup() {
	if [[ -n $vm_pid ]] && kill -0 "$vm_pid" 2>/dev/null; then
		kill "$vm_pid" 2>/dev/null || true
		wait "$vm_pid" 2>/dev/null || true
	fi
	rm -rf "$tmp" ${fetch_work:+"$fetch_work"}
}
trap cleanup EXIT
trap 'log "interrupted: stopping the VM"; exit 130' INT
trap 'log "terminated: stopping the VM"; exit 143' TERM

# ---------------------------------------------------------------- packages --

apt_updated=false
apt_update() {
	$apt_updated && return 0
	$is_root || return 1
	log "running apt-get update"
	apt-get update -qq >&2 || return 1
	apt_updated=true
}

apt_lists_present() {
	compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null
}

# ensure_pkgs PKG...: install the Debian packages that are not installed.
ensure_pkgs() {
	local p missing=()
	for p in "$@"; do
		if [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) != installed ]]; then
			missing+=("$p")
		fi
	done
	((${#missing[@]} == 0)) && return 0
	if ! $is_root; then
		die "missing Debian packages: ${missing[*]}; install them with:
  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}"
	fi
	log "installing missing Debian packages: ${missing[*]}"
	apt_lists_present || apt_update || die "apt-get update failed"
	local cmd=(apt-get install -y -qq --no-install-recommends "${missing[@]}")
	if ! DEBIAN_FRONTEND=noninteractive "${cmd[@]}" >&2; then
		apt_update || die "apt-get update failed"
		DEBIAN_FRONTEND=noninteractive "${cmd[@]}" >&2 || die "apt-get install ${missing[*]} failed"
	fi
}

ensure_pkgs qemu-system-x86 busybox-static cpio xz-utils
busybox_bin=/bin/busybox
[[ -x $busybox_bin ]] || die "$busybox_bin missing although busybox-static is installed"

# ------------------------------------------------------------------ kernel --

# resolve_kernel sets kpkg and kver to the kernel package and its candidate
# version, or returns 1.
resolve_kernel() {
	kpkg=${NITROSIGN_VM_KERNEL_PKG:-}
	if [[ -z $kpkg ]]; then
		kpkg=$(apt-cache depends "$meta_pkg" 2>/dev/null |
			awk '$1 ~ /Depends:$/ && $2 ~ /^linux-image-.*-cloud-amd64$/ { print $2; exit }') || true
	fi
	[[ -n $kpkg ]] || return 1
	kver=$(apt-cache show --no-all-versions "$kpkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1) || true
	[[ -n $kver ]]
}

# decompress_module SRC DST: copy a kernel module, decompressing .xz/.zst/.gz
# (busybox insmod cannot load compressed modules).
decompress_module() {
	case $1 in
	*.ko) cp "$1" "$2" ;;
	*.ko.xz) xz -dc "$1" >"$2" ;;
	*.ko.gz) gzip -dc "$1" >"$2" ;;
	*.ko.zst)
		ensure_pkgs zstd
		zstd -q -dc "$1" >"$2"
		;;
	*) die "unknown module format: $1" ;;
	esac
}

# modinfo_field FILE FIELD: read a field of a module's .modinfo section.
modinfo_field() {
	tr '\0' '\n' <"$1" | sed -n "s/^$2=//p" | head -n 1
}

# fetch_kernel KEY: download the kernel package, extract vmlinuz and the vsock
# loopback modules (with their dependencies, in load order) into $cache/KEY.
fetch_kernel() {
	local key=$1 work deb
	work=$(mktemp -d "$cache/.fetch.XXXXXX")
	fetch_work=$work # removed by cleanup
	chmod 755 "$work"
	log "downloading kernel package $kpkg=$kver"
	local dl=(apt-get download -q)
	$is_root && dl+=(-o APT::Sandbox::User=root)
	if ! (cd "$work" && "${dl[@]}" "$kpkg=$kver" >&2); then
		# Stale package lists name a version the mirror no longer has.
		apt_update || die "apt-get download $kpkg=$kver failed (package lists stale? run: apt-get update)"
		resolve_kernel || die "cannot resolve the kernel package after apt-get update"
		key="${kpkg#linux-image-}_$kver"
		log "retrying: downloading kernel package $kpkg=$kver"
		(cd "$work" && "${dl[@]}" "$kpkg=$kver" >&2) || die "apt-get download $kpkg=$kver failed"
	fi
	deb=$(compgen -G "$work/*.deb" | head -n 1) || true
	[[ -n $deb ]] || die "apt-get download produced no .deb"
	log "extracting $(basename "$deb")"
	dpkg-deb -x "$deb" "$work/x"
	rm -f "$deb"

	local vmlinuz moddir krel
	vmlinuz=$(compgen -G "$work/x/boot/vmlinuz-*" | head -n 1) || true
	[[ -n $vmlinuz ]] || die "no /boot/vmlinuz-* in $kpkg"
	krel=${vmlinuz##*/vmlinuz-}
	for moddir in "$work/x/lib/modules/$krel" "$work/x/usr/lib/modules/$krel" ""; do
		[[ -z $moddir || -d $moddir ]] && break
	done
	[[ -n $moddir ]] || die "no lib/modules/$krel in $kpkg"

	local out="$work/out"
	mkdir -p "$out/modules"
	cp "$vmlinuz" "$out/vmlinuz"

	# Index the package's modules by name (dashes and underscores are equal).
	local -A path=() state=()
	local f b
	while IFS= read -r -d '' f; do
		b=${f##*/}
		b=${b%%.ko*}
		path[${b//-/_}]=$f
	done < <(find "$moddir" -name '*.ko*' -print0)
	local order=()

	# visit NAME: add NAME after its dependencies (from .modinfo depends=,
	# which modpost derives from the same symbols as depmod's modules.dep).
	visit() {
		local n=${1//-/_} dst deps d magic
		case ${state[$n]:-} in
		ok) return 0 ;;
		visiting) die "module dependency cycle at $n" ;;
		esac
		state[$n]=visiting
		if [[ -z ${path[$n]:-} ]]; then
			if grep -Eq "/${n//_/[-_]}\.ko" "$moddir/modules.builtin" 2>/dev/null; then
				log "module $n is built into $krel"
				state[$n]=ok
				return 0
			fi
			die "module $n not found in $kpkg"
		fi
		dst="$out/modules/$n.ko"
		decompress_module "${path[$n]}" "$dst"
		magic=$(modinfo_field "$dst" vermagic)
		[[ ${magic%% *} == "$krel" ]] || log "warning: $n vermagic '$magic' does not match $krel"
		deps=$(modinfo_field "$dst" depends)
		IFS=, read -r -a deps <<<"$deps"
		for d in "${deps[@]}"; do
			[[ -n $d ]] && visit "$d"
		done
		state[$n]=ok
		order+=("$n")
	}
	visit vsock
	visit vmw_vsock_virtio_transport_common
	visit vsock_loopback
	printf '%s\n' "${order[@]}" >"$out/modules/load-order"
	printf '%s\n' "$krel" >"$out/kernel-release"
	printf '%s=%s\n' "$kpkg" "$kver" >"$out/package"
	log "kernel $krel: modules in load order: ${order[*]}"

	rm -rf "${cache:?}/$key"
	mv "$out" "$cache/$key"
	touch "$cache/$key/.complete"
	printf '%s\n' "$key" >"$cache/current.tmp"
	mv "$cache/current.tmp" "$cache/current"
	rm -rf "$work"
	fetch_work=
}

mkdir -p "$cache"
exec 9>"$cache/.lock"
if command -v flock >/dev/null; then
	flock 9 # serialise concurrent downloads into the cache
fi

if ! apt_lists_present && $is_root && [[ ! -s $cache/current ]]; then
	apt_update || die "apt-get update failed"
fi
key=
if resolve_kernel; then
	key="${kpkg#linux-image-}_$kver"
elif [[ -s $cache/current ]]; then
	key=$(<"$cache/current")
	log "cannot resolve $meta_pkg with apt-cache; using the last cached kernel $key"
else
	if $is_root; then
		apt_update || die "apt-get update failed"
		resolve_kernel || die "cannot resolve the kernel package of $meta_pkg"
		key="${kpkg#linux-image-}_$kver"
	else
		die "cannot resolve the kernel package of $meta_pkg; run: sudo apt-get update"
	fi
fi
if [[ -f $cache/$key/.complete ]]; then
	log "using cached kernel $key from $cache/$key"
else
	log "kernel $key not cached in $cache: fetching it"
	fetch_kernel "$key"
	key=$(<"$cache/current")
	log "cached kernel $key in $cache/$key"
fi
kdir=$cache/$key
exec 9>&-

# --------------------------------------------------------------- initramfs --


nonce=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
marker=NITROSIGN_VM_EXIT
root=$tmp/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,etc,bundle,lib/modules,nitrosign}
cp "$busybox_bin" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
if $is_root; then
	mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
fi
cp "$kdir"/modules/*.ko "$kdir/modules/load-order" "$root/lib/modules/"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$root/etc/hosts"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
printf 'root:x:0:0:root:/tmp:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"

log "copying bundle $bundle ($(du -sh "$bundle" | cut -f1))"
cp -R -L -p "$bundle/." "$root/bundle/"
while IFS= read -r -d '' f; do
	if [[ $(head -c 4 "$f" | od -An -c | tr -d ' ') == 177ELF ]] &&
		grep -qa -m 1 '/lib64/ld-linux' "$f"; then
		log "warning: $f looks dynamically linked; build with CGO_ENABLED=0"
	fi
done < <(find "$root/bundle" -type f -perm -u+x -print0)

# shquote ARG: quote ARG for a POSIX shell.
shquote() {
	local s=${1//\'/\'\\\'\'}
	printf "'%s'" "$s"
}
{
	printf '# generated by %s\n' "$prog"
	for e in "${envs[@]}"; do
		printf 'export %s=%s\n' "${e%%=*}" "$(shquote "${e#*=}")"
	done
} >"$root/nitrosign/env.sh"
{
	printf '# generated by %s\n' "$prog"
	sep=
	for a in "$@"; do
		printf '%s%s' "$sep" "$(shquote "$a")"
		sep=' '
	done
	printf '\n'
} >"$root/nitrosign/cmd.sh"

cat >"$root/init" <<EOF
#!/bin/sh
# generated by $prog
id=$nonce
EOF
cat >>"$root/init" <<'EOF'
fail() {
	echo "NITROSIGN_VM_ERROR id=$id: $*"
	sync
	poweroff -f
	sleep 10
}
/bin/busybox --install -s
mount -t devtmpfs devtmpfs /dev || fail "mount devtmpfs"
exec </dev/null >/dev/console 2>&1
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sysfs /sys || fail "mount sysfs"
mount -t tmpfs -o mode=1777 tmpfs /tmp || fail "mount tmpfs"
while read -r m; do
	insmod "/lib/modules/$m.ko" || fail "insmod $m.ko"
done </lib/modules/load-order
ifconfig lo 127.0.0.1 up || fail "ifconfig lo"
[ -c /dev/vsock ] || fail "/dev/vsock missing after loading the vsock modules"
echo "vm: guest ready after $(cut -d' ' -f1 /proc/uptime)s (kernel $(uname -r), $(nproc) cpus); running: $(cat /nitrosign/cmd.sh | tail -n 1)"
cd /bundle || fail "cd /bundle"
export PATH=/bundle:/sbin:/usr/sbin:/bin:/usr/bin HOME=/tmp TMPDIR=/tmp
. /nitrosign/env.sh
sh /nitrosign/cmd.sh
status=$?
echo "NITROSIGN_VM_EXIT=$status id=$id"
sync
poweroff -f
sleep 10
EOF
chmod 755 "$root/init"

initrd=$tmp/initrd.gz
(cd "$root" && find . -print0 | cpio --null -o -H newc -R 0:0 --quiet) | gzip -1 >"$initrd"
log "initramfs: $(du -h "$initrd" | cut -f1) (gzip)"

# --------------------------------------------------------------------- run --

krel=$(<"$kdir/kernel-release")
qemu=(
	qemu-system-x86_64
	-accel "tcg,thread=multi" -cpu max -smp "$cpus" -m "$mem"
	-nodefaults -no-user-config -display none -serial stdio -monitor none
	-no-reboot
	-kernel "$kdir/vmlinuz" -initrd "$initrd"
	-append "console=ttyS0 quiet loglevel=3 panic=-1 oops=panic"
)
if [[ -n ${NITROSIGN_VM_QEMU_ARGS:-} ]]; then
	read -r -a extra <<<"$NITROSIGN_VM_QEMU_ARGS"
	qemu+=("${extra[@]}")
fi
log "booting kernel $krel under TCG (cpus=$cpus mem=${mem}M timeout=${timeout_s}s)"

console=$tmp/console.log
fifo=$tmp/console.fifo
mkfifo "$fifo"
start=$SECONDS
# The reader strips the serial console's carriage returns and streams it.
sed -u 's/\r//g' <"$fifo" | tee "$console" &
reader_pid=$!
timeout --foreground -k 10 "$timeout_s" "${qemu[@]}" </dev/null >"$fifo" 2>&1 &
vm_pid=$!
rc=0
wait "$vm_pid" || rc=$?
vm_pid=
wait "$reader_pid" || true
elapsed=$((SECONDS - start))

status=$(grep -aoE "$marker=[0-9]+ id=$nonce" "$console" | head -n 1 | sed -E "s/^$marker=([0-9]+) .*/\1/") || true
if [[ -n $status ]]; then
	((rc == 124)) && log "warning: the VM did not power off after reporting its status"
	log "command exited with status $status (VM ran ${elapsed}s)"
	exit "$status"
fi
if ((rc == 124)); then
	log "timeout: no result after ${timeout_s}s; killed qemu"
	exit 124
fi
err=$(grep -aoE "NITROSIGN_VM_ERROR id=$nonce: .*" "$console" | head -n 1 | sed 's/^[^:]*: //') || true
if [[ -n $err ]]; then
	log "VM setup failed: $err"
elif ((rc != 0)); then
	log "qemu exited with status $rc before the command reported a status"
else
	log "the VM stopped without reporting the command's status (kernel panic or crash? see the console output above)"
fi
exit 125
