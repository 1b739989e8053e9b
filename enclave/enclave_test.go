package enclave

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/fx"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// TestValidateApp checks the graph the shipped binary runs.
func TestValidateApp(t *testing.T) {
	c := DefaultConfig()
	c.Listener.CID = 1
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

// Deterministic development keys (--dev-key-seed) run only with the
// simulated NSM: refused by Validate without --dev-simulated-nsm, and at
// start-up wherever a real NSM device exists (the simulated-NSM flag is
// then ignored), before any key is derived. Neither refusal prints the seed.
func TestDevKeySeedDevelopmentOnly(t *testing.T) {
	seed := make([]byte, 32)
	for i := range seed {
		seed[i] = 0xc3
	}
	c := DefaultConfig()
	c.Listener.CID = 1
	c.Signer.DevKeySeed = seed
	err := c.Validate()
	if !errors.Is(err, errDevKeySeed) || !contains(err.Error(), "--dev-simulated-nsm") {
		t.Fatalf("seed without the simulated NSM: %v", err)
	}

	c.Attest.DevSimulatedNSM = true
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if err := fx.ValidateApp(VsockOptions(c, zap.NewNop())); err != nil {
		t.Fatal(err)
	}

	// A real enclave: the NSM device exists (any file opens as one here;
	// the guard runs before the NSM is ever asked anything).
	dev := filepath.Join(t.TempDir(), "nsm")
	if err := os.WriteFile(dev, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	c.Attest.DevicePath = dev
	core, logs := observer.New(zapcore.DebugLevel)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	app := fx.New(Options(c, zap.New(core)), fx.Supply(fx.Annotate(l, fx.As(new(net.Listener)))), fx.NopLogger)
	err = app.Err()
	if !errors.Is(err, errDevKeySeed) || !contains(err.Error(), "real enclave") {
		t.Fatalf("seed where an NSM device exists: %v", err)
	}
	for _, e := range logs.All() {
		if contains(e.Message, "keys derived") || e.Message == "key ready" {
			t.Fatalf("a key was made before the refusal: %q", e.Message)
		}
	}
	if contains(strings.ToLower(err.Error()), "c3c3") {
		t.Fatalf("the error carries the seed: %v", err)
	}
}

// Anonymous signing (--dev-allow-anonymous) runs only with the simulated
// NSM: refused by Validate without it, and at start-up wherever a real NSM
// device exists.
func TestDevAllowAnonymousDevelopmentOnly(t *testing.T) {
	c := DefaultConfig()
	c.Listener.CID = 1
	c.Authz.DevAllowAnonymous = true
	if err := c.Validate(); !errors.Is(err, errDevAnonymous) {
		t.Fatalf("anonymous without the simulated NSM: %v", err)
	}
	c.Attest.DevSimulatedNSM = true
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	dev := filepath.Join(t.TempDir(), "nsm")
	if err := os.WriteFile(dev, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	c.Attest.DevicePath = dev
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	app := fx.New(Options(c, zap.NewNop()), fx.Supply(fx.Annotate(l, fx.As(new(net.Listener)))), fx.NopLogger)
	if err := app.Err(); !errors.Is(err, errDevAnonymous) || !contains(err.Error(), "real enclave") {
		t.Fatalf("anonymous where an NSM device exists: %v", err)
	}
}
