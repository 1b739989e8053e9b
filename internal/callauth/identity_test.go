package callauth

import (
	"bytes"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nitrosign/nitrosign/internal/keycommit"
)

func TestIdentityRoundTrip(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			id := newID(t, kind)
			if id.Type() != kind {
				t.Fatalf("Type = %q", id.Type())
			}
			der := id.PublicKeyDER()
			if id.KeyID() != KeyID(der) || id.KeyID() != keycommit.KeyID(der) || len(id.KeyID()) != 64 {
				t.Fatalf("KeyID %q is not the hex SHA-256 of the SPKI", id.KeyID())
			}
			if _, err := x509.ParsePKIXPublicKey(der); err != nil {
				t.Fatalf("PublicKeyDER: %v", err)
			}
			der[0] ^= 0xff // a copy: the identity is unchanged
			if !bytes.Equal(id.PublicKeyDER(), id.Public().PublicKeyDER()) || id.PublicKeyDER()[0] == der[0] {
				t.Fatal("PublicKeyDER is not a copy")
			}

			path := filepath.Join(t.TempDir(), "id.pem")
			if err := id.Save(path); err != nil {
				t.Fatalf("Save: %v", err)
			}
			st, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if st.Mode().Perm()&0o077 != 0 {
				t.Fatalf("identity file mode %v: readable by others", st.Mode().Perm())
			}
			before, _ := os.ReadFile(path)
			if !bytes.HasPrefix(before, []byte("-----BEGIN PRIVATE KEY-----\n")) {
				t.Fatalf("identity file is not a PEM PRIVATE KEY:\n%s", before)
			}
			loaded, err := LoadIdentity(path)
			if err != nil {
				t.Fatalf("LoadIdentity: %v", err)
			}
			if loaded.KeyID() != id.KeyID() || loaded.Type() != kind {
				t.Fatalf("loaded %v, saved %v", loaded, id)
			}

			// Never overwritten.
			other := newID(t, kind)
			err = other.Save(path)
			if !errors.Is(err, fs.ErrExist) || !strings.Contains(err.Error(), path) {
				t.Fatalf("Save over an existing file: %v", err)
			}
			after, _ := os.ReadFile(path)
			if !bytes.Equal(before, after) {
				t.Fatal("Save changed an existing file")
			}

			// The public key, as DER and as PEM.
			for _, in := range [][]byte{id.PublicKeyDER(), id.PublicKeyPEM(), append(append([]byte("\n  "), id.PublicKeyPEM()...), "\n\n"...)} {
				c, err := ParsePublicKey(in)
				if err != nil {
					t.Fatalf("ParsePublicKey: %v", err)
				}
				if c.KeyID() != id.KeyID() || c.Type() != kind || !bytes.Equal(c.PublicKeyPEM(), id.PublicKeyPEM()) {
					t.Fatalf("ParsePublicKey = %v, want %v", c, id.Public())
				}
			}
		})
	}
}

// No way of printing an identity shows its private key.
func TestIdentityNeverPrintsTheKey(t *testing.T) {
	for _, kind := range kinds {
		id := newID(t, kind)
		der, err := x509.MarshalPKCS8PrivateKey(map[string]any{TypeEd25519: id.ed, TypeP256: id.ec}[kind])
		if err != nil {
			t.Fatal(err)
		}
		var secret []string
		switch kind {
		case TypeEd25519:
			secret = []string{hex.EncodeToString(id.ed.Seed()), fmt.Sprint([]byte(id.ed.Seed()))}
		case TypeP256:
			d, _ := id.ec.Bytes()
			n := new(big.Int).SetBytes(d)
			secret = []string{hex.EncodeToString(d), n.String(), n.Text(16)}
		}
		b64 := base64.StdEncoding.EncodeToString(der)
		secret = append(secret, b64[len(b64)-24:len(b64)-4])
		for _, format := range []string{"%v", "%+v", "%#v", "%s", "%x", "%q"} {
			for _, v := range []any{id, *id, []*Identity{id}, struct{ ID *Identity }{id}} {
				out := fmt.Sprintf(format, v)
				for _, s := range secret {
					if strings.Contains(out, s) {
						t.Fatalf("%s of %T shows the private key: %s", format, v, out)
					}
				}
			}
		}
		if got := fmt.Sprint(id); !strings.Contains(got, id.KeyID()) || !strings.Contains(got, kind) {
			t.Errorf("String = %q", got)
		}
	}
}

func TestNewIdentityUnsupported(t *testing.T) {
	for _, kind := range []string{"", "rsa", "P256", "ed448", "ecdsa"} {
		if _, err := NewIdentity(kind); !errors.Is(err, ErrUnsupportedKey) {
			t.Errorf("NewIdentity(%q): %v", kind, err)
		}
	}
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func pkcs8(t *testing.T, key any) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// Every file LoadIdentity refuses, refused precisely, naming the file and
// never quoting it.
func TestLoadIdentityRefusals(t *testing.T) {
	dir := t.TempDir()
	rsaKey, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	sec1, _ := x509.MarshalECPrivateKey(p256)
	x25519, _ := ecdh.X25519().GenerateKey(rand.Reader)
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	good := pemBlock("PRIVATE KEY", pkcs8(t, edKey))
	corrupt := pkcs8(t, edKey)
	corrupt = corrupt[:len(corrupt)-3]
	withHeaders := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Headers: map[string]string{"Proc-Type": "4,ENCRYPTED"}, Bytes: pkcs8(t, edKey)})

	for _, tc := range []struct {
		name    string
		content []byte // nil: no file
		is      error
		want    string
	}{
		{"missing", nil, fs.ErrNotExist, "no such file"},
		{"empty", []byte{}, nil, "no PEM block"},
		{"text", []byte("hunter2 is my password\n"), nil, "no PEM block"},
		{"public key", pemBlock("PUBLIC KEY", []byte("secret-looking-bytes")), nil, "not a PRIVATE KEY"},
		{"sec1", pemBlock("EC PRIVATE KEY", sec1), nil, "openssl pkcs8 -topk8"},
		{"rsa pkcs1", pemBlock("RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(rsaKey)), ErrUnsupportedKey, "RSA"},
		{"rsa pkcs8", pemBlock("PRIVATE KEY", pkcs8(t, rsaKey)), ErrUnsupportedKey, "an RSA key"},
		{"p384", pemBlock("PRIVATE KEY", pkcs8(t, p384)), ErrUnsupportedKey, "P-384"},
		{"x25519", pemBlock("PRIVATE KEY", pkcs8(t, x25519)), ErrUnsupportedKey, "ecdh.PrivateKey"},
		{"encrypted", pemBlock("ENCRYPTED PRIVATE KEY", []byte("0123456789")), nil, "encrypted"},
		{"headers", withHeaders, nil, "headers"},
		{"two keys", append(append([]byte{}, good...), good...), nil, "one key only"},
		{"trailing text", append(append([]byte{}, good...), "my note: hunter2\n"...), nil, "one key only"},
		{"corrupt der", pemBlock("PRIVATE KEY", corrupt), nil, "not a valid PKCS#8"},
		{"too large", bytes.Repeat([]byte("A"), maxIdentityFile+1), nil, "larger than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".pem")
			if tc.content != nil {
				if err := os.WriteFile(path, tc.content, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			id, err := LoadIdentity(path)
			if err == nil {
				t.Fatalf("loaded %v", id)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("error %v does not wrap %v", err, tc.is)
			}
			msg := err.Error()
			if !strings.Contains(msg, tc.want) || !strings.Contains(msg, path) {
				t.Errorf("error %q does not say %q and name %s", msg, tc.want, path)
			}
			// Never a line of the content, nor its base64.
			for _, line := range strings.Split(string(tc.content), "\n") {
				if len(line) >= 8 && !strings.HasPrefix(line, "-----") && strings.Contains(msg, line) {
					t.Errorf("error quotes the file: %q", msg)
				}
			}
			for _, s := range []string{"hunter2", "secret-looking", "0123456789"} {
				if strings.Contains(msg, s) {
					t.Errorf("error quotes the file: %q", msg)
				}
			}
		})
	}

	// openssl's own files load: a PKCS#8 P-256 key as "openssl genpkey"
	// writes it (the curve as a named OID, the public key included).
	path := filepath.Join(dir, "openssl-p256.pem")
	if err := os.WriteFile(path, pemBlock("PRIVATE KEY", pkcs8(t, p256)), 0o600); err != nil {
		t.Fatal(err)
	}
	if id, err := LoadIdentity(path); err != nil || id.Type() != TypeP256 {
		t.Fatalf("P-256 PKCS#8: %v, %v", id, err)
	}
}

func TestSaveErrors(t *testing.T) {
	if err := (*Identity)(nil).Save(filepath.Join(t.TempDir(), "x")); err == nil {
		t.Fatal("nil identity saved")
	}
	id := newID(t, TypeEd25519)
	path := filepath.Join(t.TempDir(), "no", "such", "dir", "id.pem")
	if err := id.Save(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Save into a missing directory: %v", err)
	}
}

func TestParsePublicKeyRefusals(t *testing.T) {
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 1024)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	x25519, _ := ecdh.X25519().GenerateKey(rand.Reader)
	spki := func(k any) []byte {
		der, err := x509.MarshalPKIXPublicKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return der
	}
	id := newID(t, TypeP256)
	for _, tc := range []struct {
		name string
		in   []byte
		is   error
		want string
	}{
		{"empty", nil, nil, "not a DER SubjectPublicKeyInfo"},
		{"garbage", []byte("nope"), nil, "not a DER SubjectPublicKeyInfo"},
		{"trailing byte", append(id.PublicKeyDER(), 0), nil, "not a DER SubjectPublicKeyInfo"},
		{"rsa", spki(&rsaKey.PublicKey), ErrUnsupportedKey, "RSA"},
		{"p384", spki(&p384.PublicKey), ErrUnsupportedKey, "P-384"},
		{"x25519", spki(x25519.PublicKey()), ErrUnsupportedKey, "ecdh.PublicKey"},
		{"certificate pem", pemBlock("CERTIFICATE", id.PublicKeyDER()), nil, "want PUBLIC KEY"},
		{"two pems", append(id.PublicKeyPEM(), id.PublicKeyPEM()...), nil, "more than one PEM block"},
		{"broken pem", []byte("-----BEGIN PUBLIC KEY-----\n!!!\n"), nil, "malformed PEM"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParsePublicKey(tc.in)
			if err == nil {
				t.Fatalf("parsed %v", c)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("error %v does not wrap %v", err, tc.is)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
		})
	}
	var zero Caller
	if zero.Type() != "" || zero.KeyID() != "" || zero.PublicKeyPEM() != nil || zero.String() != "callauth.Caller(none)" {
		t.Fatalf("zero Caller: %q %q %q", zero.Type(), zero.KeyID(), zero)
	}
}
