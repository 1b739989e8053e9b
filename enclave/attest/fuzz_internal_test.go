package attest

import (
	"testing"
	"time"

	"go.uber.org/zap"
)

// FuzzLeafNotAfter feeds arbitrary bytes to the enclave's own attestation
// document parser (leafNotAfter reads the leaf certificate's expiry to know
// when to renew the cached document): it must never panic, and a document
// it accepts must have a leaf with a real expiry. The host's verifier has
// its own fuzz target (host/verify FuzzVerify).
//
//	go test -run='^$' -fuzz=FuzzLeafNotAfter -fuzztime=30s ./enclave/attest/
func FuzzLeafNotAfter(f *testing.F) {
	sim, err := newSimulated(zap.NewNop(), time.Now, nil, nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = sim.Close() })
	for _, args := range [][3][]byte{{}, {[]byte("nonce"), []byte("user data"), nil}} {
		doc, err := sim.Attestation(args[0], args[1], args[2])
		if err != nil {
			f.Fatal(err)
		}
		f.Add(doc)
		f.Add(doc[:len(doc)/2])
		f.Add(append([]byte{0xd2}, doc...)) // COSE tag 18: the untagged parser must refuse or cope
	}
	f.Add([]byte{})
	f.Add([]byte{0x84, 0x40, 0xa0, 0x40, 0x40})
	f.Fuzz(func(t *testing.T, doc []byte) {
		at, err := leafNotAfter(doc)
		if err == nil && at.IsZero() {
			t.Fatal("accepted a document without a leaf expiry")
		}
	})
}
