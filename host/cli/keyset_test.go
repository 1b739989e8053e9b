package cli

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nitrosign/nitrosign/internal/keysetfmt"
)

const keysetARN = "arn:aws:kms:eu-west-1:111122223333:key/0b5c5a3e-1f2d-4c6b-9a8e-7d6f5e4d3c2b"

// sealedKeyset is a well-formed sealed keyset naming ids: only its header
// is ever read here.
func sealedKeyset(t *testing.T, created time.Time, ids ...string) []byte {
	t.Helper()
	frame, err := keysetfmt.Frame(keysetfmt.Header{KMSKeyARN: keysetARN, KeyIDs: ids, Created: created, Sealed: created.Add(time.Hour)}, []byte("data key blob"))
	if err != nil {
		t.Fatal(err)
	}
	return append(frame, make([]byte, keysetfmt.NonceSize+48)...)
}

func writeKeysetFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestKeysetInit(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "keyset.sealed")

	r := mustOK(t, run(t, "", "keyset", "init", "--file", path))
	for _, want := range []string{"new keyset requested: " + path + ".init created", "the next enclave start", "within its next retry",
		"creates a new keyset, seals it", "To cancel before then: rm " + path + ".init"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("init output lacks %q:\n%s", want, r.stdout)
		}
	}
	if _, err := os.Stat(path + ".init"); err != nil {
		t.Fatalf("no marker: %v", err)
	}
	r = mustOK(t, run(t, "", "keyset", "init", "--file", path))
	if !strings.Contains(r.stdout, "requested already") {
		t.Fatalf("second init: %q", r.stdout)
	}

	for _, existing := range []string{"keyset.sealed", "keyset.sealed.prev"} {
		d := t.TempDir()
		writeKeysetFile(t, filepath.Join(d, existing), sealedKeyset(t, time.Now(), "aa"))
		p := filepath.Join(d, "keyset.sealed")
		r := run(t, "", "keyset", "init", "--file", p)
		if r.code != ExitFailure || !strings.Contains(r.stderr, "a keyset exists ("+filepath.Join(d, existing)+
			"): init would replace nothing but is refused so that no keyset is ever replaced by accident") {
			t.Fatalf("init with %s: exit %d, stderr %q", existing, r.code, r.stderr)
		}
		if _, err := os.Stat(p + ".init"); err == nil {
			t.Fatalf("init with %s created the marker", existing)
		}
	}

	for _, tt := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"keyset", "init", "--file", filepath.Join(dir, "missing", "keyset.sealed")}, ExitFailure, "StateDirectory=nitrosign"},
		{[]string{"keyset", "init", "--file", "keyset.sealed"}, ExitUsage, "want an absolute path"},
		{[]string{"keyset", "init", "--file", path, "--output", "json"}, ExitUsage, "--output is for keyset show"},
		{[]string{"keyset", "init", "extra"}, ExitUsage, `unexpected argument "extra"`},
		{[]string{"keyset"}, ExitUsage, "keyset needs a subcommand: init or show"},
		{[]string{"keyset", "rotate"}, ExitUsage, `keyset "rotate": want init or show`},
	} {
		r := run(t, "", tt.args...)
		if r.code != tt.code || !strings.Contains(r.stderr, tt.want) {
			t.Errorf("%v: exit %d, stderr %q; want %d and %q", tt.args, r.code, r.stderr, tt.code, tt.want)
		}
	}
	if r := run(t, "", "keyset", "-h"); r.code != ExitOK || !strings.Contains(r.stderr, "nitrosign keyset show") || !strings.Contains(r.stderr, "-file") {
		t.Fatalf("keyset -h: exit %d, stderr %q", r.code, r.stderr)
	}
}

func TestKeysetShow(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "keyset.sealed")
	created := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)

	// None.
	r := run(t, "", "keyset", "show", "--file", path)
	if r.code != ExitFailure || !strings.Contains(r.stdout, path+": none") || !strings.Contains(r.stderr, "nitrosign keyset init") {
		t.Fatalf("show of none: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	mustOK(t, run(t, "", "keyset", "init", "--file", path))
	r = run(t, "", "keyset", "show", "--file", path)
	if r.code != ExitFailure || !strings.Contains(r.stdout, "a new keyset is requested") {
		t.Fatalf("show after init: exit %d, stdout %q", r.code, r.stdout)
	}
	if err := os.Remove(path + ".init"); err != nil {
		t.Fatal(err)
	}

	cur, prev := sealedKeyset(t, created, "k1", "k2"), sealedKeyset(t, created.Add(-24*time.Hour), "k0")
	writeKeysetFile(t, path, cur)
	writeKeysetFile(t, path+".prev", prev)
	curSum, prevSum := sha256.Sum256(cur), sha256.Sum256(prev)
	r = mustOK(t, run(t, "", "keyset", "show", "--file", path))
	for _, want := range []string{
		"keyset    " + path, "format    1", "KMS key   " + keysetARN, "key ids   k1\n            k2",
		"created   2025-03-01T12:00:00Z", "sealed    2025-03-01T13:00:00Z",
		"size      " + strconv.Itoa(len(cur)) + " bytes", "SHA-256   " + hex.EncodeToString(curSum[:]),
		"previous  " + path + ".prev", "key ids   k0", "created   2025-02-28T12:00:00Z", "SHA-256   " + hex.EncodeToString(prevSum[:]),
	} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("show lacks %q:\n%s", want, r.stdout)
		}
	}

	r = mustOK(t, run(t, "", "keyset", "show", "--file", path, "--output", "json"))
	var got struct {
		Keyset, Previous *keysetJSON
		Init             bool `json:"init_requested"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &got); err != nil {
		t.Fatalf("%v: %s", err, r.stdout)
	}
	if got.Keyset == nil || got.Keyset.SHA256 != hex.EncodeToString(curSum[:]) || got.Keyset.KMSKeyARN != keysetARN || len(got.Keyset.KeyIDs) != 2 ||
		got.Keyset.Created != "2025-03-01T12:00:00Z" || got.Previous == nil || got.Previous.Size != int64(len(prev)) || got.Init {
		t.Fatalf("show json: %s", r.stdout)
	}

	// A file that does not parse: its size and hash, the reason, exit 1.
	writeKeysetFile(t, path, []byte("not a keyset"))
	r = run(t, "", "keyset", "show", "--file", path)
	if r.code != ExitFailure || !strings.Contains(r.stdout, "ERROR     sealed keyset corrupt") || !strings.Contains(r.stdout, "size      12 bytes") ||
		!strings.Contains(r.stderr, "does not parse") {
		t.Fatalf("show of junk: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	// Larger than a keyset can be.
	writeKeysetFile(t, path, make([]byte, keysetfmt.MaxSize+1))
	r = run(t, "", "keyset", "show", "--file", path)
	if r.code != ExitFailure || !strings.Contains(r.stderr, "is 1048577 bytes, and a sealed keyset is at most 1048576") {
		t.Fatalf("show of a large file: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	if r := run(t, "", "keyset", "show", "--file", path, "--output", "yaml"); r.code != ExitUsage {
		t.Fatalf("--output yaml: exit %d", r.code)
	}
}
