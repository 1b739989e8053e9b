package attest_test

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"testing"

	"go.uber.org/fx"
	"go.uber.org/fx/fxtest"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/fakes/devroot"
	"github.com/nitrosign/nitrosign/internal/keycommit/keycommittest"
)

func TestModule(t *testing.T) {
	keys := keycommittest.Keys(t)
	var (
		a      *attest.Attester
		nsm    attest.NSM
		seeder attest.Seeder
	)
	opts := []fx.Option{
		attest.Module,
		fx.Supply(attest.Config{DevSimulatedNSM: true, DevicePath: filepath.Join(t.TempDir(), "nsm")}),
		fx.Supply(zaptest.NewLogger(t)),
		fx.Provide(func() attest.KeySource { return staticKeys(keys) }),
		fx.NopLogger,
	}
	if err := fx.ValidateApp(opts...); err != nil {
		t.Fatalf("ValidateApp: %v", err)
	}
	app := fxtest.New(t, append(opts, fx.Populate(&a, &nsm, &seeder))...)
	app.RequireStart()
	if nsm != seeder.(attest.NSM) {
		t.Error("Seeder is not the NSM")
	}
	if err := seeder.SeedKernelEntropy(); err != nil {
		t.Errorf("SeedKernelEntropy: %v", err)
	}
	if got := a.NSMCalls(); got != 1 {
		t.Errorf("after start, NSMCalls = %d, want 1 (start-up document warmed)", got)
	}
	res, err := a.Attest(context.Background(), nil, nil)
	if err != nil || !res.Simulated || a.NSMCalls() != 1 {
		t.Fatalf("Attest after start: %v, simulated %v, calls %d", err, res != nil && res.Simulated, a.NSMCalls())
	}
	app.RequireStop()
	if _, err := nsm.Attestation(nil, nil, nil); err == nil {
		t.Error("NSM still open after stop")
	}
}

func TestModuleWithoutDevice(t *testing.T) {
	app := fx.New(
		attest.Module,
		fx.Supply(attest.Config{DevicePath: filepath.Join(t.TempDir(), "nsm")}),
		fx.Supply(zap.NewNop()),
		fx.Provide(func() attest.KeySource { return staticKeys(nil) }),
		fx.Invoke(func(*attest.Attester) {}),
		fx.NopLogger,
	)
	if err := app.Err(); !errors.Is(err, attest.ErrNoDevice) {
		t.Fatalf("app error = %v, want ErrNoDevice", err)
	}
}

// Simulated NSMs given one development root chain their documents to it,
// so that one test KMS can trust several simulated enclaves.
func TestSimulatedFromOneRoot(t *testing.T) {
	root, err := devroot.New()
	if err != nil {
		t.Fatal(err)
	}
	a, err := attest.NewSimulatedFromRoot(nil, root)
	if err != nil {
		t.Fatal(err)
	}
	b, err := attest.NewSimulatedFromRoot(nil, root)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.DevRootDER(), b.DevRootDER()) {
		t.Fatal("two simulated NSMs from one root report different roots")
	}
	if _, err := attest.NewSimulatedFromRoot(nil, root[:len(root)/2]); err == nil {
		t.Fatal("a root file without its key was accepted")
	}
	if err := (attest.Config{DevRootFile: "/x"}).Validate(); err == nil {
		t.Fatal("a development root without the simulated NSM was accepted")
	}
}
