package verify_test

import (
	"bytes"
	"crypto/x509"
	"errors"
	"testing"

	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/host/verify"
)

// FuzzVerify feeds arbitrary bytes to Verify, against the AWS root at the
// genuine document's time and against a simulated NSM's dev root. Verify
// must never panic, must return a document exactly when it returns no
// error, and every error must wrap exactly one sentinel.
//
//	go test -run='^$' -fuzz=FuzzVerify -fuzztime=20s ./host/verify/
func FuzzVerify(f *testing.F) {
	doc := genuine(f)
	sim, err := attest.NewSimulated(zap.NewNop())
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { sim.Close() })
	devRoot, err := x509.ParseCertificate(sim.DevRootDER())
	if err != nil {
		f.Fatal(err)
	}
	simDoc, err := sim.Attestation([]byte("nonce"), []byte("user data"), []byte("public key"))
	if err != nil {
		f.Fatal(err)
	}
	simStartup, err := sim.Attestation(nil, nil, nil)
	if err != nil {
		f.Fatal(err)
	}
	for _, seed := range [][]byte{
		doc,
		append([]byte{0xd2}, doc...),
		simDoc,
		simStartup,
		doc[:len(doc)/2],
		{},
	} {
		f.Add(seed)
	}
	optsList := []verify.Options{
		{Time: genuineTime},
		{Root: devRoot},
		{Root: devRoot, Nonce: []byte("nonce"), AllowDebug: true},
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		for _, opts := range optsList {
			d, err := verify.Verify(in, opts)
			if err != nil {
				if d != nil {
					t.Fatalf("document returned with error %v", err)
				}
				n := 0
				for _, s := range sentinels {
					if errors.Is(err, s) {
						n++
					}
				}
				if n != 1 {
					t.Fatalf("error %q wraps %d sentinels, want 1", err, n)
				}
				continue
			}
			if d == nil || d.Certificate == nil || !bytes.Equal(d.Raw, in) {
				t.Fatalf("Verify succeeded with document %+v", d)
			}
		}
	})
}
