package cli

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nitrosign/nitrosign/enclave/enclavetest"
	"github.com/nitrosign/nitrosign/internal/callauth"
)

func TestIdentityCreateShow(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		typ  string
	}{
		{nil, callauth.TypeEd25519},
		{[]string{"--type", "ed25519"}, callauth.TypeEd25519},
		{[]string{"--type", "p256"}, callauth.TypeP256},
	} {
		file := filepath.Join(dir, tc.typ+"-"+strings.Join(tc.args, "")+".pem")
		r := mustOK(t, run(t, "", append([]string{"identity", "create", "--out", file}, tc.args...)...))
		id, err := callauth.LoadIdentity(file)
		if err != nil {
			t.Fatal(err)
		}
		if id.Type() != tc.typ {
			t.Fatalf("%v: type %s", tc.args, id.Type())
		}
		for _, want := range []string{file, "key id    " + id.KeyID(), "type      " + tc.typ, string(id.PublicKeyPEM()), `policy    "public_key": "-----BEGIN PUBLIC KEY-----\n`} {
			if !strings.Contains(r.stdout, want) {
				t.Fatalf("create output lacks %q:\n%s", want, r.stdout)
			}
		}
		if st, _ := os.Stat(file); st.Mode().Perm() != 0o600 {
			t.Fatalf("identity file mode %v", st.Mode().Perm())
		}
		// The policy line is the PEM as a JSON string.
		line := r.stdout[strings.Index(r.stdout, `"public_key": `)+len(`"public_key": `):]
		var pemStr string
		if err := json.Unmarshal([]byte(strings.TrimSpace(line)), &pemStr); err != nil || pemStr != string(id.PublicKeyPEM()) {
			t.Fatalf("policy line %q: %v", line, err)
		}

		r = mustOK(t, run(t, "", "identity", "show", "--identity", file))
		if !strings.Contains(r.stdout, id.KeyID()) || !strings.Contains(r.stdout, string(id.PublicKeyPEM())) || !strings.Contains(r.stdout, "type      "+tc.typ) {
			t.Fatalf("show output:\n%s", r.stdout)
		}
		r = mustOK(t, run(t, "", "identity", "show", "--identity", file, "--output", "json"))
		var j identityJSON
		if err := json.Unmarshal([]byte(r.stdout), &j); err != nil {
			t.Fatal(err)
		}
		if j != (identityJSON{File: file, Type: tc.typ, KeyID: id.KeyID(), PublicKeyPEM: string(id.PublicKeyPEM())}) {
			t.Fatalf("show json: %+v", j)
		}
		// Nothing printed carries the private key.
		key, _ := os.ReadFile(file)
		body := strings.Split(string(key), "\n")[1]
		if strings.Contains(r.stdout+r.stderr, body[len(body)-20:]) {
			t.Fatal("show printed the private key")
		}
	}

	// Never overwritten.
	file := filepath.Join(dir, "once.pem")
	mustOK(t, run(t, "", "identity", "create", "--out", file, "--output", "json"))
	before, _ := os.ReadFile(file)
	r := run(t, "", "identity", "create", "--out", file)
	if r.code != ExitFailure || !strings.Contains(r.stderr, "refusing to overwrite "+file) || !strings.Contains(r.stderr, "only copy") {
		t.Fatalf("create over an existing file: exit %d, %q", r.code, r.stderr)
	}
	if after, _ := os.ReadFile(file); string(after) != string(before) {
		t.Fatal("create overwrote an identity")
	}

	// Usage errors, before anything is written.
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"identity"}, "needs a subcommand"},
		{[]string{"identity", "delete"}, `identity "delete": want create or show`},
		{[]string{"identity", "create"}, "needs --out FILE"},
		{[]string{"identity", "create", "--out", filepath.Join(dir, "x.pem"), "--type", "rsa"}, `--type "rsa": want ed25519 or p256`},
		{[]string{"identity", "create", "--out", filepath.Join(dir, "x.pem"), "--identity", file}, "--identity is for identity show"},
		{[]string{"identity", "create", "--out", filepath.Join(dir, "x.pem"), "extra"}, "unexpected argument"},
		{[]string{"identity", "create", "--out", filepath.Join(dir, "x.pem"), "--output", "yaml"}, "want text or json"},
		{[]string{"identity", "show"}, "needs --identity FILE"},
		{[]string{"identity", "show", "--identity", file, "--type", "p256"}, "--out and --type are for identity create"},
		{[]string{"identity", "show", "--identity", file, "--target", "tcp://127.0.0.1:1"}, "flag provided but not defined: -target"},
	} {
		r := run(t, "", tc.args...)
		if r.code != ExitUsage || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want usage error with %q", tc.args, r.code, r.stderr, tc.want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "x.pem")); !os.IsNotExist(err) {
		t.Fatal("a refused create wrote a file")
	}
	if r := run(t, "", "identity", "-h"); r.code != ExitOK || !strings.Contains(r.stderr, "caller policy") {
		t.Fatalf("identity -h: exit %d, %q", r.code, r.stderr)
	}

	// show of a file that is no identity: named, never quoted.
	bad := filepath.Join(dir, "notes.txt")
	writeFile(t, bad, "my password is hunter2\n")
	r = run(t, "", "identity", "show", "--identity", bad)
	if r.code != ExitFailure || !strings.Contains(r.stderr, bad) || !strings.Contains(r.stderr, "no PEM block") || strings.Contains(r.stderr, "hunter2") {
		t.Fatalf("show of a non-identity: exit %d, %q", r.code, r.stderr)
	}
}

// --identity against a real enclave that checks callers against its
// policy: the signature carries Sign and key administration through, the
// policy decides; without an identity, or with one the policy does not
// name, the enclave refuses.
func TestIdentityFlagAgainstEnclave(t *testing.T) {
	dir := t.TempDir()
	mk := func(name, typ string) (string, *callauth.Identity) {
		file := filepath.Join(dir, name+".pem")
		mustOK(t, run(t, "", "identity", "create", "--out", file, "--type", typ))
		id, err := callauth.LoadIdentity(file)
		if err != nil {
			t.Fatal(err)
		}
		return file, id
	}
	signerFile, signer := mk("signer", "ed25519")
	adminFile, admin := mk("admin", "p256")
	strangerFile, _ := mk("stranger", "ed25519")
	policy := map[string]any{
		"version": 1,
		"callers": []map[string]any{
			{"name": "signer", "public_key": string(signer.PublicKeyPEM()), "sign": []map[string]any{{"key_types": []string{"ECC"}}}},
			{"name": "admin", "public_key": string(admin.PublicKeyPEM()), "admin": true},
		},
	}
	pj, _ := json.Marshal(policy)
	policyFile := filepath.Join(dir, "policy.json")
	writeFile(t, policyFile, string(pj))

	cfg := enclavetest.DefaultConfig()
	cfg.Authz.DevAllowAnonymous = false
	cfg.Authz.PolicyFile = policyFile
	e := enclavetest.Start(t, cfg, 0)
	tg := "--target=" + e.Target

	sig := strings.TrimSpace(mustOK(t, run(t, "hello", "sign", tg, "--identity", signerFile, "--key-type", "ecc")).stdout)
	mustOK(t, run(t, "hello", "verify", tg, "--key-type", "ecc", "--signature", sig))
	// The same command again: a fresh nonce, accepted.
	mustOK(t, run(t, "hello", "sign", tg, "--identity", signerFile, "--key-type", "ecc"))
	// Calls that need no signature take --identity and ignore it.
	mustOK(t, run(t, "", "echo", tg, "--identity", signerFile))
	mustOK(t, run(t, "", "keys", tg, "--identity", signerFile))

	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"no identity", []string{"sign", "--key-type", "ecc", "--message", "x"}, []string{"Unauthenticated", "no caller signature"}},
		{"unknown caller", []string{"sign", "--identity", strangerFile, "--key-type", "ecc", "--message", "x"}, []string{"Unauthenticated", "unknown caller"}},
		{"key not granted", []string{"sign", "--identity", signerFile, "--key-type", "rsa", "--message", "x"}, []string{"PermissionDenied", `caller "signer"`}},
		{"admin may not sign", []string{"sign", "--identity", adminFile, "--key-type", "ecc", "--message", "x"}, []string{"PermissionDenied", `caller "admin"`}},
		{"signer may not administer", []string{"keys", "create", "--identity", signerFile, "--type", "ecc"}, []string{"PermissionDenied", "may not administer keys"}},
		// Authenticated and allowed: the enclave's own answer (its keys are
		// ephemeral, not a sealed keyset).
		{"admin administers", []string{"keys", "create", "--identity", adminFile, "--type", "ecc"}, []string{"FailedPrecondition", "--key-mode sealed"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := run(t, "", append(tc.args, tg)...)
			if r.code != ExitFailure {
				t.Fatalf("exit %d, %q", r.code, r.stderr)
			}
			for _, w := range tc.want {
				if !strings.Contains(r.stderr, w) {
					t.Fatalf("stderr %q does not say %q", r.stderr, w)
				}
			}
		})
	}

	// An --identity that cannot be loaded stops the command before it
	// calls: the file is named, its content never shown.
	notes := filepath.Join(dir, "notes.txt")
	writeFile(t, notes, "-----BEGIN RSA PRIVATE KEY-----\naHVudGVyMg==\n-----END RSA PRIVATE KEY-----\n")
	for file, want := range map[string]string{
		notes:                         "unsupported key",
		filepath.Join(dir, "missing"): "no such file",
	} {
		r := run(t, "", "sign", tg, "--identity", file, "--key-type", "ecc", "--message", "x")
		if r.code != ExitFailure || !strings.Contains(r.stderr, "--identity") || !strings.Contains(r.stderr, file) || !strings.Contains(r.stderr, want) || strings.Contains(r.stderr, "aHVudGVyMg") {
			t.Fatalf("--identity %s: exit %d, %q", file, r.code, r.stderr)
		}
	}
}
