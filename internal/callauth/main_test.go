package callauth

import (
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// kinds are the identity types every test runs for.
var kinds = []string{TypeEd25519, TypeP256}

func newID(t testing.TB, kind string) *Identity {
	t.Helper()
	id, err := NewIdentity(kind)
	if err != nil {
		t.Fatalf("NewIdentity(%s): %v", kind, err)
	}
	return id
}
