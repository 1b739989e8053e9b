package authz

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

func pubPEM(t *testing.T, pub any) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
}

func policyJSON(t *testing.T, callers ...fileCaller) []byte {
	t.Helper()
	b, err := json.Marshal(file{Version: 1, Callers: callers})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParseAndRules(t *testing.T) {
	edPub, _, _ := ed25519.GenerateKey(rand.Reader)
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	raw := policyJSON(t,
		fileCaller{Name: "payments", PublicKey: pubPEM(t, edPub), Sign: []fileRule{{KeyTypes: []string{"ECC"}, Algorithms: []string{"ECDSA_SHA_256"}}}},
		fileCaller{Name: "ops", PublicKey: pubPEM(t, &ec.PublicKey), Admin: true},
		fileCaller{Name: "anything", PublicKey: pubPEM(t, mustEd(t)), Sign: []fileRule{{}}},
		fileCaller{Name: "one-key", PublicKey: pubPEM(t, mustEd(t)), Sign: []fileRule{{KeyIDs: []string{strings.Repeat("ab", 32)}}}},
	)
	p, err := Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	if p.SHA256() != sha256.Sum256(raw) || string(p.Raw()) != string(raw) {
		t.Fatal("the policy's digest or bytes are not the file's")
	}
	der, _ := x509.MarshalPKIXPublicKey(edPub)
	sum := sha256.Sum256(der)
	id := ""
	for _, b := range sum {
		id += string("0123456789abcdef"[b>>4]) + string("0123456789abcdef"[b&15])
	}
	pay, ok := p.Caller(id)
	if !ok || pay.Name != "payments" || pay.Admin {
		t.Fatalf("caller by key id: %v %v", pay, ok)
	}
	kid := strings.Repeat("cd", 32)
	for _, tc := range []struct {
		name string
		c    string
		typ  pb.KeyType
		id   string
		alg  pb.SigningAlgorithm
		want bool
	}{
		{"payments, ECC, its algorithm", "payments", pb.KeyType_KEY_TYPE_ECC, kid, pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256, true},
		{"payments, ECC, another algorithm", "payments", pb.KeyType_KEY_TYPE_ECC, kid, pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_384, false},
		{"payments, RSA", "payments", pb.KeyType_KEY_TYPE_RSA, kid, pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_256, false},
		{"ops: admin only", "ops", pb.KeyType_KEY_TYPE_ECC, kid, pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256, false},
		{"anything", "anything", pb.KeyType_KEY_TYPE_RSA, kid, pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_512, true},
		{"one-key, that key", "one-key", pb.KeyType_KEY_TYPE_RSA, strings.Repeat("ab", 32), pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_512, true},
		{"one-key, another key", "one-key", pb.KeyType_KEY_TYPE_RSA, kid, pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_512, false},
	} {
		var c *Caller
		for _, x := range p.callers {
			if x.Name == tc.c {
				c = x
			}
		}
		if got := c.MaySign(tc.id, tc.typ, tc.alg); got != tc.want {
			t.Errorf("%s: MaySign = %v, want %v", tc.name, got, tc.want)
		}
	}
	path := filepath.Join(t.TempDir(), "policy.json")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	if q, err := Load(path); err != nil || q.SHA256() != p.SHA256() {
		t.Fatalf("Load: %v", err)
	}
}

func mustEd(t *testing.T) ed25519.PublicKey {
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return pub
}

func TestParseRefusals(t *testing.T) {
	ed := pubPEM(t, mustEd(t))
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	for _, tc := range []struct {
		name, raw, want string
	}{
		{"not JSON", `{`, "not valid policy JSON"},
		{"unknown field", `{"version":1,"callers":[],"extra":1}`, "unknown field"},
		{"trailing data", `{"version":1,"callers":[]} {}`, "trailing data"},
		{"version 2", `{"version":2,"callers":[]}`, "version 2"},
		{"no name", string(policyJSON(t, fileCaller{PublicKey: ed})), "name must be"},
		{"not PEM", string(policyJSON(t, fileCaller{Name: "a", PublicKey: "x"})), "PEM"},
		{"RSA caller key", string(policyJSON(t, fileCaller{Name: "a", PublicKey: pubPEM(t, &rsaKey.PublicKey)})), "want Ed25519 or ECDSA P-256"},
		{"P-384 caller key", string(policyJSON(t, fileCaller{Name: "a", PublicKey: pubPEM(t, &p384.PublicKey)})), "P-256"},
		{"bad key type", string(policyJSON(t, fileCaller{Name: "a", PublicKey: ed, Sign: []fileRule{{KeyTypes: []string{"DSA"}}}})), `key type "DSA"`},
		{"bad key id", string(policyJSON(t, fileCaller{Name: "a", PublicKey: ed, Sign: []fileRule{{KeyIDs: []string{"ABC"}}}})), "64 lower-case hex"},
		{"bad algorithm", string(policyJSON(t, fileCaller{Name: "a", PublicKey: ed, Sign: []fileRule{{Algorithms: []string{"MD5"}}}})), `algorithm "MD5"`},
		{"same name twice", string(policyJSON(t, fileCaller{Name: "a", PublicKey: ed}, fileCaller{Name: "a", PublicKey: pubPEM(t, mustEd(t))})), "appears twice"},
		{"same key twice", string(policyJSON(t, fileCaller{Name: "a", PublicKey: ed}, fileCaller{Name: "b", PublicKey: ed})), "public key of another caller"},
	} {
		if _, err := Parse([]byte(tc.raw)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error with %q", tc.name, err, tc.want)
		}
	}
	big := filepath.Join(t.TempDir(), "big.json")
	if err := os.WriteFile(big, make([]byte, MaxPolicySize+1), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(big); err == nil || !strings.Contains(err.Error(), "over") {
		t.Fatalf("an oversized policy: %v", err)
	}
}
