package enclave

import (
	"strings"
	"testing"

	"go.uber.org/fx"
	"go.uber.org/zap"
)

// TestValidateApp checks the graph the shipped binary runs.
func TestValidateApp(t *testing.T) {
	var c Config
	c.Listener.CID, c.Listener.Port = 1, 5005
	c.Signer.Ed25519 = true
	c.Attest.DevSimulatedNSM = true
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if err := fx.ValidateApp(VsockOptions(c, zap.NewNop())); err != nil {
		t.Fatal(err)
	}
}

func TestConfigValidate(t *testing.T) {
	var c Config
	c.Listener.Port = 9000
	c.Signer.RSABits = 1024
	err := c.Validate()
	if err == nil {
		t.Fatal("want errors")
	}
	for _, want := range []string{"9000", "RSA key size 1024"} {
		if !contains(err.Error(), want) {
			t.Errorf("error %q does not name %q", err, want)
		}
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }
