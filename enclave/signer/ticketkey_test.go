package signer

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"testing"
	"time"

	"go.uber.org/zap"

	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// The session ticket key follows the keyset: two signers with the same
// keys derive the same (enclaves of one sealed keyset accept each other's
// tickets), a rotation keeps it (keys are added and disabled, the oldest
// stays), other keys give another, and there is none without keys.
func TestSessionTicketKey(t *testing.T) {
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	keys := []Key{
		{Type: pb.KeyType_KEY_TYPE_ECC, Version: 1, Created: t0.Add(time.Second), Private: ec},
		{Type: pb.KeyType_KEY_TYPE_ED25519, Version: 1, Created: t0, Private: ed},
	}
	a, b := &Signer{}, &Signer{}
	if _, err := a.SessionTicketKey(); !errors.Is(err, ErrNotReady) {
		t.Fatalf("SessionTicketKey without keys = %v", err)
	}
	if err := a.Install(keys); err != nil {
		t.Fatal(err)
	}
	if err := b.Install([]Key{keys[1], keys[0]}); err != nil {
		t.Fatal(err)
	}
	ka, err := a.SessionTicketKey()
	if err != nil {
		t.Fatal(err)
	}
	kb, err := b.SessionTicketKey()
	if err != nil {
		t.Fatal(err)
	}
	if *ka != *kb {
		t.Fatal("two signers with the same keys derive different ticket keys")
	}
	if again, _ := a.SessionTicketKey(); again != ka {
		t.Fatal("the same keys gave another pointer")
	}

	// Rotation: a new ECC version, the first one disabled.
	ec2, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rotated := []Key{keys[0], keys[1], {Type: pb.KeyType_KEY_TYPE_ECC, Version: 2, Created: t0.Add(time.Hour), Private: ec2}}
	rotated[1].Disabled = true
	if err := a.Install(rotated); err != nil {
		t.Fatal(err)
	}
	if kr, _ := a.SessionTicketKey(); *kr != *ka {
		t.Fatal("a rotation changed the ticket key")
	}

	// Other keys: another ticket key.
	if err := b.Install([]Key{{Type: pb.KeyType_KEY_TYPE_ECC, Version: 1, Created: t0, Private: ec2}}); err != nil {
		t.Fatal(err)
	}
	if ko, _ := b.SessionTicketKey(); *ko == *ka {
		t.Fatal("other keys gave the same ticket key")
	}
	b.SetNotReady("test")
	if _, err := b.SessionTicketKey(); !errors.Is(err, ErrNotReady) {
		t.Fatalf("SessionTicketKey after SetNotReady = %v", err)
	}
	// Ephemeral keys: each signer its own.
	if k1, k2 := testSigner(t), mustNew(t); k1 == k2 {
		t.Fatal("one signer")
	} else if x, _ := k1.SessionTicketKey(); x == nil {
		t.Fatal("an ephemeral signer has no ticket key")
	} else if y, _ := k2.SessionTicketKey(); *x == *y {
		t.Fatal("two ephemeral signers derive the same ticket key")
	}
}

func mustNew(t *testing.T) *Signer {
	t.Helper()
	s, err := New(Params{Config: Config{}, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	return s
}
