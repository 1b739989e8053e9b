// Package auditfmttest builds audit chains for tests, straight from the
// format (internal/auditfmt), independently of the enclave's Log: the
// verifier's and the receiver's tests forge, edit and reorder them.
package auditfmttest

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/nitrosign/nitrosign/internal/auditfmt"
)

// Chain is a chain under construction.
type Chain struct {
	ID      string
	Key     ed25519.PrivateKey
	Entries []*auditfmt.Entry
	// Time is the next entry's time; each entry adds a millisecond.
	Time time.Time
}

// New starts a chain: a fresh audit key, attested by attest, and the
// genesis naming previous.
func New(attest func(spki []byte) ([]byte, error), previous *auditfmt.Head) (*Chain, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	doc, err := attest(spki)
	if err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}
	id := make([]byte, auditfmt.ChainBytes)
	_, _ = rand.Read(id)
	c := &Chain{ID: hex.EncodeToString(id), Key: priv, Time: time.Now()}
	c.Append(&auditfmt.Entry{Kind: auditfmt.KindGenesis, AuditKey: spki, Attestation: doc, PreviousHead: previous})
	return c, nil
}

// Append seals e as the chain's next entry.
func (c *Chain) Append(e *auditfmt.Entry) *auditfmt.Entry {
	e.Chain, e.Seq, e.Time = c.ID, uint64(len(c.Entries)), auditfmt.FormatTime(c.Time)
	e.Prev = auditfmt.ZeroHash
	if n := len(c.Entries); n > 0 {
		e.Prev = c.Entries[n-1].Hash
	}
	e.Hash, _ = e.ComputeHash(nil)
	c.Entries = append(c.Entries, e)
	c.Time = c.Time.Add(time.Millisecond)
	return e
}

// Decision appends an allowed decision for key, over message's hash.
func (c *Chain) Decision(key string, messageSHA256 [32]byte) *auditfmt.Entry {
	return c.Append(&auditfmt.Entry{
		Kind: auditfmt.KindDecision, Caller: "test", CallerID: "ab12", Method: "/nitrosign.v1.SignerService/Sign",
		KeyID: key, Algorithm: "ECDSA_SHA_256", MessageSHA256: hex.EncodeToString(messageSHA256[:]),
		Outcome: auditfmt.OutcomeAllowed, Code: "OK",
	})
}

// Head appends a head signed by the chain's key.
func (c *Chain) Head() *auditfmt.Entry { return c.HeadBy(c.Key) }

// HeadBy appends a head signed by key (a forgery when it is not the
// chain's).
func (c *Chain) HeadBy(key ed25519.PrivateKey) *auditfmt.Entry {
	last := c.Entries[len(c.Entries)-1]
	h := &auditfmt.Entry{Kind: auditfmt.KindHead, SignedSeq: last.Seq, SignedHash: last.Hash}
	h.Signature = ed25519.Sign(key, auditfmt.HeadMessage(c.ID, h.SignedSeq, h.SignedHash))
	return c.Append(h)
}

// LastHead names the chain's last head.
func (c *Chain) LastHead() *auditfmt.Head {
	for i := len(c.Entries) - 1; i >= 0; i-- {
		if e := c.Entries[i]; e.Kind == auditfmt.KindHead {
			h := auditfmt.HeadOf(e)
			return &h
		}
	}
	return nil
}

// Lines are the chain's lines, each with its newline.
func (c *Chain) Lines() [][]byte {
	out := make([][]byte, len(c.Entries))
	for i, e := range c.Entries {
		out[i] = append(e.AppendJSON(nil), '\n')
	}
	return out
}
