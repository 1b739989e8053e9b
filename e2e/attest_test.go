package e2e

import (
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"errors"
	"testing"

	"github.com/nitrosign/nitrosign/host/verify"
	"github.com/nitrosign/nitrosign/internal/keycommit/keycommittest"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Attestation through the proxy over vsock: the document binds the nonce
// and the keys the enclave serves; a key swapped in transit is detected.
func TestAttestationThroughProxy(t *testing.T) {
	e := startEnclave(t, vsockPort())
	p := startProxy(t, e.target, 2)
	c := dial(t, p.target, 1)
	nonce := make([]byte, 32)
	if _, err := rand.Read(nonce); err != nil {
		t.Fatal(err)
	}
	resp, err := c.Attestation.Attest(callCtx(t), &pb.AttestRequest{Nonce: nonce})
	if err != nil {
		t.Fatal(err)
	}
	if !resp.Simulated {
		t.Fatal("the VM has no /dev/nsm, yet the document is not marked simulated")
	}
	root, err := x509.ParseCertificate(resp.SimulatedRootCertificate)
	if err != nil {
		t.Fatal(err)
	}
	opts := verify.Options{Root: root, Nonce: nonce, Keys: resp.Keys, RequireKeyCommitment: true}
	doc, err := verify.Verify(resp.Document, opts)
	if err != nil {
		t.Fatalf("document through the proxy does not verify: %v", err)
	}
	t.Logf("verified document from %s at %s binding %d keys", doc.ModuleID, doc.Timestamp, len(resp.Keys))

	// The keys it commits to are the keys the enclave serves.
	keys, err := c.Signer.ListKeys(callCtx(t), &pb.ListKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(keys.Keys) != len(resp.Keys) {
		t.Fatalf("ListKeys has %d keys, the attestation %d", len(keys.Keys), len(resp.Keys))
	}
	for i := range keys.Keys {
		if keys.Keys[i].KeyId != resp.Keys[i].KeyId {
			t.Fatalf("key %d differs between ListKeys and Attest", i)
		}
	}
	// Against the AWS root, a simulated document fails.
	if _, err := verify.Verify(resp.Document, verify.Options{Nonce: nonce}); !errors.Is(err, verify.ErrChain) {
		t.Fatalf("simulated document against the AWS root: %v, want ErrChain", err)
	}
	// A man in the middle (a proxy, say) that swaps in a key of its own,
	// with a consistent id, breaks the commitment.
	mitmKey := keycommittest.Ed25519(t, 7)
	mitm := []*pb.KeyInfo{resp.Keys[0], resp.Keys[1], mitmKey}
	opts.Keys = mitm
	if _, err := verify.Verify(resp.Document, opts); !errors.Is(err, verify.ErrKeyCommitment) {
		t.Fatalf("a swapped key: %v, want ErrKeyCommitment", err)
	}

	// The CLI does the same through the proxy.
	out, err := cli(t, "", "attest", "--target", p.target, "--dev-trust-server-root", "--output", "json")
	if err != nil {
		t.Fatal(err)
	}
	var j struct {
		Verified bool `json:"verified"`
	}
	if err := json.Unmarshal([]byte(out), &j); err != nil || !j.Verified {
		t.Fatalf("nitrosign attest through the proxy: %s (%v)", out, err)
	}
}
