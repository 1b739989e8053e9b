#!/usr/bin/env bash
# Checks the floor plan (README, "Layout"): a package imports only its own
# floor or the ones below. Floor 1 is proto/ and internal/; floor 2 is
# enclave/ and host/, which never import each other; floor 3 (cmd/,
# reliability/, e2e/, fakes/) may import anything. Tests may reach a sibling on
# their floor (host/verify's tests run enclave/attest's documents); only
# the packages' own imports are checked.
set -euo pipefail
cd "$(dirname "$0")/.."
mod=$(go list -m)
fail=0
check() { # check FLOOR_PATTERN FORBIDDEN_REGEX
	local out
	out=$(go list -f '{{.ImportPath}}{{range .Imports}} {{.}}{{end}}' "$1" |
		awk -v re="^$mod/($2)(/|\$)" '{ for (i = 2; i <= NF; i++) if ($i ~ re) print $1 " imports " $i }')
	if [[ -n "$out" ]]; then
		echo "floor plan broken:"
		echo "$out"
		fail=1
	fi
}
check ./proto/... 'internal|enclave|host|cmd|reliability|e2e'
check ./internal/... 'enclave|host|cmd|reliability|e2e'
check ./enclave/... 'host|cmd|reliability|e2e'
check ./host/... 'enclave|cmd|reliability|e2e'
# The fakes (an AWS KMS of our own) are for tests and the demo: no
# shipped binary may link them.
shipped=(./enclave/cmd/... ./host/cmd/...)
if linked=$(go list -deps "${shipped[@]}" | grep -E "^$mod/fakes(/|\$)"); then
	echo "floor plan broken: a shipped binary links a fake:"
	echo "$linked"
	fail=1
fi
exit $fail
