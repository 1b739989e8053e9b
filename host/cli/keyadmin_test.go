package cli

import (
	"strings"
	"testing"

	"github.com/nitrosign/nitrosign/enclave/enclavetest"
)

// keys create|disable|enable: precise usage errors before any call, and
// the enclave's own answer when its keys cannot be rotated (ephemeral).
// The rotation itself is tested end to end on a sealed enclave
// (enclave/keyset, and e2e's TestSealedKeysetSurvivesRestart).
func TestKeyAdminCommands(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"keys", "create"}, "needs --type"},
		{[]string{"keys", "create", "--type", "dsa"}, `--type "dsa"`},
		{[]string{"keys", "create", "--type", "rsa", "extra"}, "takes no argument"},
		{[]string{"keys", "disable"}, "needs one KEY_ID"},
		{[]string{"keys", "enable", "a", "b"}, "needs one KEY_ID"},
		{[]string{"keys", "disable", "--type", "rsa", "x"}, "--type is for keys create"},
		{[]string{"keys", "create", "--bogus"}, "flag provided but not defined"},
	} {
		r := run(t, "", tc.args...)
		if r.code != ExitUsage || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want usage error with %q", tc.args, r.code, r.stderr, tc.want)
		}
	}
	if r := run(t, "", "keys", "create", "-h"); r.code != ExitOK || !strings.Contains(r.stderr, "Rotates a sealed keyset") {
		t.Errorf("keys create -h: exit %d, %q", r.code, r.stderr)
	}

	e := enclavetest.Start(t, enclavetest.DefaultConfig(), 0)
	r := run(t, "", "keys", "create", "--target", e.Target, "--type", "ecc")
	if r.code != ExitFailure || !strings.Contains(r.stderr, "FailedPrecondition") || !strings.Contains(r.stderr, "--key-mode sealed") {
		t.Fatalf("keys create on ephemeral keys: exit %d, %q", r.code, r.stderr)
	}
	r = mustOK(t, run(t, "", "keys", "--target", e.Target))
	if !strings.Contains(r.stdout, "VERSION") || strings.Count(r.stdout, "ENABLED") != 3 || strings.Count(r.stdout, " *") != 3 {
		t.Fatalf("keys lists no versions, states or defaults:\n%s", r.stdout)
	}
}
