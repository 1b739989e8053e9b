package verify_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"testing"
	"time"

	"github.com/fxamacker/cbor/v2"
	"github.com/veraison/go-cose"

	"github.com/nitrosign/nitrosign/host/verify"
)

// This file forges documents with a test chain, so that every field and
// header can be varied while the signature stays valid.

// forgeNow is the clock of forged documents and of their verification.
var forgeNow = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

type caOptions struct {
	leafCurve     elliptic.Curve
	interNotAfter time.Time
	leafNotAfter  time.Time
}

type testCA struct {
	root, inter, leaf *x509.Certificate
	rootKey, interKey *ecdsa.PrivateKey
	leafKey           *ecdsa.PrivateKey
}

func newTestCA(t *testing.T, mods ...func(*caOptions)) *testCA {
	t.Helper()
	o := caOptions{
		leafCurve:     elliptic.P384(),
		interNotAfter: forgeNow.Add(24 * time.Hour),
		leafNotAfter:  forgeNow.Add(3 * time.Hour),
	}
	for _, m := range mods {
		m(&o)
	}
	ca := &testCA{rootKey: genKey(t, elliptic.P384()), interKey: genKey(t, elliptic.P384()), leafKey: genKey(t, o.leafCurve)}
	ca.root = mkCert(t, "test root", true, forgeNow.Add(-time.Hour), forgeNow.Add(48*time.Hour), &ca.rootKey.PublicKey, nil, ca.rootKey)
	ca.inter = mkCert(t, "test intermediate", true, forgeNow.Add(-time.Hour), o.interNotAfter, &ca.interKey.PublicKey, ca.root, ca.rootKey)
	ca.leaf = mkCert(t, "test leaf", false, forgeNow.Add(-time.Minute), o.leafNotAfter, &ca.leafKey.PublicKey, ca.inter, ca.interKey)
	return ca
}

func genKey(t *testing.T, c elliptic.Curve) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mkCert(t *testing.T, cn string, ca bool, from, to time.Time, pub *ecdsa.PublicKey, parent *x509.Certificate, key *ecdsa.PrivateKey) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             from,
		NotAfter:              to,
		IsCA:                  ca,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature,
	}
	if ca {
		tmpl.KeyUsage |= x509.KeyUsageCertSign
	}
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// field is one payload entry; a cbor.RawMessage value is written verbatim.
type field struct {
	key   string
	value any
}

// testPCRs are 16 non-zero 48-byte values.
func testPCRs() map[uint64][]byte {
	m := map[uint64][]byte{}
	for i := uint64(0); i < 16; i++ {
		sum := sha512.Sum384([]byte{byte(i)})
		m[i] = sum[:]
	}
	return m
}

// fields is a complete, valid payload in the NSM's order.
func (ca *testCA) fields() []field {
	return []field{
		{"module_id", "i-0123456789abcdef0-enc0123456789abcdef"},
		{"digest", "SHA384"},
		{"timestamp", uint64(forgeNow.UnixMilli())},
		{"pcrs", testPCRs()},
		{"certificate", ca.leaf.Raw},
		{"cabundle", [][]byte{ca.root.Raw, ca.inter.Raw}},
		{"public_key", nil},
		{"user_data", []byte("ud")},
		{"nonce", []byte("nonce")},
	}
}

// with returns fs with key set to value (appended when absent); a nil
// cbor.RawMessage value removes the key.
func with(fs []field, key string, value any) []field {
	out := make([]field, 0, len(fs)+1)
	found := false
	for _, f := range fs {
		if f.key == key {
			found = true
			if r, ok := value.(cbor.RawMessage); ok && r == nil {
				continue
			}
			f.value = value
		}
		out = append(out, f)
	}
	if !found {
		out = append(out, field{key, value})
	}
	return out
}

func without(fs []field, key string) []field { return with(fs, key, cbor.RawMessage(nil)) }

func encodePayload(t *testing.T, fs []field, indefinite bool) []byte {
	t.Helper()
	em, err := cbor.CoreDetEncOptions().EncMode()
	if err != nil {
		t.Fatal(err)
	}
	var b []byte
	if indefinite {
		b = []byte{0xbf}
	} else {
		if len(fs) >= 24 {
			t.Fatal("too many fields for a one-byte map header")
		}
		b = []byte{0xa0 | byte(len(fs))}
	}
	for _, f := range fs {
		k, err := em.Marshal(f.key)
		if err != nil {
			t.Fatal(err)
		}
		v, ok := f.value.(cbor.RawMessage)
		if !ok {
			if v, err = em.Marshal(f.value); err != nil {
				t.Fatal(err)
			}
		}
		b = append(append(b, k...), v...)
	}
	if indefinite {
		b = append(b, 0xff)
	}
	return b
}

type signSpec struct {
	alg         cose.Algorithm // zero: ES384
	protected   cose.ProtectedHeader
	unprotected cose.UnprotectedHeader
}

// sign makes an untagged COSE_Sign1 over payload with the leaf key.
func (ca *testCA) sign(t *testing.T, payload []byte, spec signSpec) []byte {
	t.Helper()
	alg := spec.alg
	if alg == 0 {
		alg = cose.AlgorithmES384
	}
	prot := spec.protected
	if prot == nil {
		prot = cose.ProtectedHeader{cose.HeaderLabelAlgorithm: alg}
	}
	unprot := spec.unprotected
	if unprot == nil {
		unprot = cose.UnprotectedHeader{}
	}
	signer, err := cose.NewSigner(alg, ca.leafKey)
	if err != nil {
		t.Fatal(err)
	}
	doc, err := cose.Sign1Untagged(rand.Reader, signer, cose.Headers{Protected: prot, Unprotected: unprot}, payload, nil)
	if err != nil {
		t.Fatal(err)
	}
	return doc
}

func (ca *testCA) doc(t *testing.T, fs []field) []byte {
	t.Helper()
	return ca.sign(t, encodePayload(t, fs, true), signSpec{})
}

func (ca *testCA) opts() verify.Options {
	return verify.Options{Root: ca.root, Time: forgeNow}
}

var sentinels = []error{
	verify.ErrMalformed, verify.ErrFieldTooLarge, verify.ErrChain, verify.ErrExpired,
	verify.ErrSignature, verify.ErrNonce, verify.ErrPCRMismatch, verify.ErrDebugPCRs,
	verify.ErrKeyCommitment,
}

// sentinelOf returns the one sentinel err wraps; it fails the test when err
// wraps none or several.
func sentinelOf(t *testing.T, err error) error {
	t.Helper()
	var found []error
	for _, s := range sentinels {
		if errors.Is(err, s) {
			found = append(found, s)
		}
	}
	if len(found) != 1 {
		t.Fatalf("error %q wraps %d sentinels, want exactly one", err, len(found))
	}
	return found[0]
}

// wantErr checks that Verify failed with want (and no other sentinel).
func wantErr(t *testing.T, d *verify.Document, err, want error) {
	t.Helper()
	if err == nil {
		t.Fatalf("Verify succeeded, want %v", want)
	}
	if d != nil {
		t.Errorf("Verify returned a document with error %v", err)
	}
	if got := sentinelOf(t, err); got != want {
		t.Fatalf("Verify error = %v, want %v", err, want)
	}
}
