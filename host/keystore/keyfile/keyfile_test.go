package keyfile_test

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nitrosign/nitrosign/host/keystore/keyfile"
	"github.com/nitrosign/nitrosign/internal/keysetfmt"
)

const testARN = "arn:aws:kms:eu-west-1:111122223333:key/0b5c5a3e-1f2d-4c6b-9a8e-7d6f5e4d3c2b"

// sealed is a well-formed sealed keyset naming keyIDs (random blob, nonce
// and ciphertext: nothing here opens one).
func sealed(t *testing.T, keyIDs ...string) []byte {
	t.Helper()
	if len(keyIDs) == 0 {
		keyIDs = []string{"aa11"}
	}
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	blob := make([]byte, 184)
	_, _ = rand.Read(blob)
	frame, err := keysetfmt.Frame(keysetfmt.Header{KMSKeyARN: testARN, KeyIDs: keyIDs, Created: now, Sealed: now}, blob)
	if err != nil {
		t.Fatal(err)
	}
	tail := make([]byte, keysetfmt.NonceSize+64)
	_, _ = rand.Read(tail)
	return append(frame, tail...)
}

func write(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func read(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func absent(t *testing.T, path string) {
	t.Helper()
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("%s exists (err %v), want it absent", path, err)
	}
}

func sum(b []byte) []byte { s := sha256.Sum256(b); return s[:] }

func TestValidatePath(t *testing.T) {
	for _, tt := range []struct{ path, want string }{
		{"/var/lib/nitrosign/keyset.sealed", ""},
		{"", "empty"},
		{"keyset.sealed", "want an absolute path"},
		{"/var/lib/../lib/nitrosign/keyset.sealed", "want a clean path"},
		{"/var/lib/nitrosign/", "want a clean path"},
		{"/", "names a directory"},
	} {
		err := keyfile.ValidatePath(tt.path)
		if tt.want == "" && err != nil || tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)) {
			t.Errorf("ValidatePath(%q) = %v, want %q", tt.path, err, tt.want)
		}
	}
}

func TestRequestInit(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "keyset.sealed")
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	created, err := keyfile.RequestInit(path, now)
	if err != nil || !created {
		t.Fatalf("RequestInit = %v, %v", created, err)
	}
	if b := read(t, keyfile.InitPath(path)); !strings.Contains(string(b), "2025-03-01T12:00:00Z") {
		t.Fatalf("marker %q", b)
	}
	if created, err := keyfile.RequestInit(path, now); err != nil || created {
		t.Fatalf("second RequestInit = %v, %v; want the request to stand", created, err)
	}
	for _, existing := range []string{path, keyfile.PrevPath(path)} {
		d := t.TempDir()
		p := filepath.Join(d, "keyset.sealed")
		write(t, strings.Replace(existing, dir, d, 1), sealed(t))
		_, err := keyfile.RequestInit(p, now)
		if !errors.Is(err, keyfile.ErrExists) || !strings.Contains(err.Error(), "init would replace nothing but is refused so that no keyset is ever replaced by accident") {
			t.Fatalf("RequestInit with %s = %v", existing, err)
		}
		absent(t, keyfile.InitPath(p))
	}
	if _, err := keyfile.RequestInit(filepath.Join(dir, "nope", "keyset.sealed"), now); err == nil || !strings.Contains(err.Error(), "StateDirectory") {
		t.Fatalf("RequestInit without a directory = %v", err)
	}
}

func TestInspect(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keyset.sealed")
	if _, err := keyfile.Inspect(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Inspect of nothing = %v", err)
	}
	ks := sealed(t, "k1", "k2")
	write(t, path, ks)
	info, err := keyfile.Inspect(path)
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != int64(len(ks)) || info.SHA256 != hex.EncodeToString(sum(ks)) || info.Header == nil || info.Header.KMSKeyARN != testARN || info.ParseErr != nil {
		t.Fatalf("Inspect = %+v", info)
	}
	write(t, path, []byte("junk"))
	info, err = keyfile.Inspect(path)
	if err != nil || info.Header != nil || !errors.Is(info.ParseErr, keysetfmt.ErrCorrupt) {
		t.Fatalf("Inspect of junk = %+v, %v", info, err)
	}
}
