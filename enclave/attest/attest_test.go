package attest_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/host/verify"
	"github.com/nitrosign/nitrosign/internal/keycommit"
	"github.com/nitrosign/nitrosign/internal/keycommit/keycommittest"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeNSM is a function-field stub; nil fields give simple defaults.
type fakeNSM struct {
	attestation func(nonce, userData, publicKey []byte) ([]byte, error)
	random      func(p []byte) error
	calls       atomic.Int64
}

func (f *fakeNSM) Attestation(nonce, userData, publicKey []byte) ([]byte, error) {
	f.calls.Add(1)
	if f.attestation != nil {
		return f.attestation(nonce, userData, publicKey)
	}
	return []byte("doc"), nil
}

func (f *fakeNSM) Random(p []byte) error {
	if f.random != nil {
		return f.random(p)
	}
	return nil
}

func (f *fakeNSM) Close() error { return nil }

type keySource func() []*pb.KeyInfo

func (k keySource) Keys() []*pb.KeyInfo { return k() }

func staticKeys(keys []*pb.KeyInfo) attest.KeySource {
	return keySource(func() []*pb.KeyInfo { return keys })
}

// clock is a settable time source safe for concurrent use.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func newAttester(t *testing.T, nsm attest.NSM, keys attest.KeySource) *attest.Attester {
	t.Helper()
	a, err := attest.New(attest.Params{Logger: zaptest.NewLogger(t), NSM: nsm, Keys: keys})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func ctxT(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestOpen(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "nsm")
	present := filepath.Join(dir, "present")
	if err := os.WriteFile(present, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		cfg      attest.Config
		wantErr  error
		wantType string
		wantLog  string
	}{
		{name: "no device, no dev flag", cfg: attest.Config{DevicePath: missing}, wantErr: attest.ErrNoDevice},
		{name: "no device, dev flag", cfg: attest.Config{DevicePath: missing, DevSimulatedNSM: true},
			wantType: "*attest.Simulated", wantLog: "NOT genuine"},
		{name: "device", cfg: attest.Config{DevicePath: present}, wantType: "*attest.Device"},
		{name: "device and dev flag: the device wins", cfg: attest.Config{DevicePath: present, DevSimulatedNSM: true},
			wantType: "*attest.Device", wantLog: "flag is ignored"},
		{name: "relative device path", cfg: attest.Config{DevicePath: "dev/nsm"}, wantErr: nil, wantType: "error"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			core, logs := observer.New(zapcore.DebugLevel)
			n, err := attest.Open(tt.cfg, zap.New(core))
			if tt.wantType == "error" {
				if err == nil {
					t.Fatal("Open succeeded, want a validation error")
				}
				return
			}
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Open error = %v, want %v", err, tt.wantErr)
				}
				for _, s := range []string{"not running in a Nitro Enclave", "--dev-simulated-nsm", "will not be genuine", missing} {
					if !strings.Contains(err.Error(), s) {
						t.Errorf("error %q does not mention %q", err, s)
					}
				}
				return
			}
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			t.Cleanup(func() { n.Close() })
			if got := typeName(n); got != tt.wantType {
				t.Errorf("Open returned %s, want %s", got, tt.wantType)
			}
			if _, ok := n.(attest.Seeder); !ok {
				t.Error("the NSM is not a Seeder")
			}
			if tt.wantLog != "" {
				found := false
				for _, e := range logs.FilterLevelExact(zapcore.WarnLevel).All() {
					found = found || strings.Contains(e.Message, tt.wantLog)
				}
				if !found {
					t.Errorf("no warning containing %q", tt.wantLog)
				}
			}
		})
	}
}

func typeName(v any) string {
	switch v.(type) {
	case *attest.Simulated:
		return "*attest.Simulated"
	case *attest.Device:
		return "*attest.Device"
	default:
		return "other"
	}
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		cfg attest.Config
		ok  bool
	}{
		{attest.Config{}, true},
		{attest.Config{DevicePath: "/dev/nsm", EntropyPath: "/dev/random", CacheMaxAge: time.Minute}, true},
		{attest.Config{DevicePath: "nsm"}, false},
		{attest.Config{EntropyPath: "random"}, false},
		{attest.Config{CacheMaxAge: -time.Second}, false},
	}
	for _, tt := range tests {
		if err := tt.cfg.Validate(); (err == nil) != tt.ok {
			t.Errorf("%+v: Validate = %v, want ok %v", tt.cfg, err, tt.ok)
		}
	}
}

func simulated(t *testing.T) (*attest.Simulated, *x509.Certificate) {
	t.Helper()
	sim, err := attest.NewSimulated(zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	root, err := x509.ParseCertificate(sim.DevRootDER())
	if err != nil {
		t.Fatal(err)
	}
	return sim, root
}

func TestSimulatedDocumentsVerify(t *testing.T) {
	sim, root := simulated(t)
	tests := []struct {
		name                        string
		nonce, userData, publicKey  []byte
		wantNonce, wantUD, wantPubK []byte
	}{
		{name: "all absent"},
		{name: "empty means absent", nonce: []byte{}, userData: []byte{}, publicKey: []byte{}},
		{name: "all set", nonce: []byte("n"), userData: []byte("u"), publicKey: []byte("p"),
			wantNonce: []byte("n"), wantUD: []byte("u"), wantPubK: []byte("p")},
		{name: "at the limits", nonce: bytes.Repeat([]byte{1}, attest.MaxFieldSize),
			userData: bytes.Repeat([]byte{2}, attest.MaxFieldSize), publicKey: bytes.Repeat([]byte{3}, attest.MaxFieldSize),
			wantNonce: bytes.Repeat([]byte{1}, attest.MaxFieldSize), wantUD: bytes.Repeat([]byte{2}, attest.MaxFieldSize),
			wantPubK: bytes.Repeat([]byte{3}, attest.MaxFieldSize)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			doc, err := sim.Attestation(tt.nonce, tt.userData, tt.publicKey)
			if err != nil {
				t.Fatal(err)
			}
			d, err := verify.Verify(doc, verify.Options{Root: root, PCRs: attest.SimulatedPCRs(), Nonce: tt.wantNonce})
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if !bytes.Equal(d.Nonce, tt.wantNonce) || !bytes.Equal(d.UserData, tt.wantUD) || !bytes.Equal(d.PublicKey, tt.wantPubK) {
				t.Errorf("fields: nonce %d bytes, user_data %d, public_key %d", len(d.Nonce), len(d.UserData), len(d.PublicKey))
			}
			if d.ModuleID != sim.ModuleID() || !strings.HasPrefix(d.ModuleID, "i-00000000000000000-dev") {
				t.Errorf("module_id %q", d.ModuleID)
			}
			if tt.wantNonce == nil && !bytes.HasSuffix(d.Payload, []byte("enonce\xf6\xff")) {
				t.Error("an absent nonce is not encoded as null, the NSM's way")
			}
			if _, err := verify.Verify(doc, verify.Options{}); !errors.Is(err, verify.ErrChain) {
				t.Errorf("against the AWS root: %v, want ErrChain", err)
			}
		})
	}
}

func TestSimulatedPCRs(t *testing.T) {
	pcrs := attest.SimulatedPCRs()
	if len(pcrs) != 16 {
		t.Fatalf("%d PCRs, want 16", len(pcrs))
	}
	for i, v := range pcrs {
		zero := bytes.Equal(v, make([]byte, 48))
		if len(v) != 48 || zero != (i > 2) {
			t.Errorf("PCR%d = %x: want 48 bytes, non-zero exactly for PCR0..2", i, v)
		}
	}
	pcrs[0][0] ^= 1
	if bytes.Equal(pcrs[0], attest.SimulatedPCRs()[0]) {
		t.Error("SimulatedPCRs returns shared slices")
	}
}

func TestSimulatedLeafRenewal(t *testing.T) {
	clk := &clock{t: time.Now()}
	sim, err := attest.NewSimulatedAt(zaptest.NewLogger(t), clk.now)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	root, err := x509.ParseCertificate(sim.DevRootDER())
	if err != nil {
		t.Fatal(err)
	}
	var leaves []*x509.Certificate
	for i := 0; i < 4; i++ {
		doc, err := sim.Attestation(nil, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		d, err := verify.Verify(doc, verify.Options{Root: root, Time: clk.now()})
		if err != nil {
			t.Fatalf("after %d advances: %v", i, err)
		}
		leaves = append(leaves, d.Certificate)
		clk.advance(90 * time.Minute)
	}
	// 3 h leaves renewed with less than 1 h left: t0, t0+1.5h share one.
	if !leaves[0].Equal(leaves[1]) || leaves[1].Equal(leaves[2]) {
		t.Error("leaf renewed at the wrong time")
	}
}

func TestSimulatedRefusals(t *testing.T) {
	sim, _ := simulated(t)
	big := make([]byte, attest.MaxFieldSize+1)
	for _, tc := range []struct {
		name                       string
		nonce, userData, publicKey []byte
	}{
		{"nonce", big, nil, nil}, {"user_data", nil, big, nil}, {"public_key", nil, nil, big},
	} {
		_, err := sim.Attestation(tc.nonce, tc.userData, tc.publicKey)
		if !errors.Is(err, attest.ErrInvalidArgument) || !strings.Contains(err.Error(), tc.name) || !strings.Contains(err.Error(), "1024") {
			t.Errorf("oversized %s: %v", tc.name, err)
		}
	}
	p := make([]byte, 64)
	if err := sim.Random(p); err != nil || bytes.Equal(p, make([]byte, 64)) {
		t.Errorf("Random: %v, %x", err, p)
	}
	if err := sim.SeedKernelEntropy(); err != nil {
		t.Errorf("SeedKernelEntropy: %v", err)
	}
	root := sim.DevRootDER()
	root[0] ^= 1
	if bytes.Equal(root, sim.DevRootDER()) {
		t.Error("DevRootDER returns shared bytes")
	}
	if err := sim.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := sim.Attestation(nil, nil, nil); !errors.Is(err, attest.ErrNSM) {
		t.Errorf("after Close: %v, want ErrNSM", err)
	}
	if err := sim.Random(p); !errors.Is(err, attest.ErrNSM) {
		t.Errorf("Random after Close: %v, want ErrNSM", err)
	}
}

func TestAttesterCache(t *testing.T) {
	keys := keycommittest.Keys(t)
	startup, _ := keycommit.Compute(keys, nil)
	fake := &fakeNSM{}
	var mu sync.Mutex
	var seen [][2][]byte
	fake.attestation = func(nonce, userData, publicKey []byte) ([]byte, error) {
		if publicKey != nil {
			t.Errorf("public_key %x sent", publicKey)
		}
		mu.Lock()
		seen = append(seen, [2][]byte{nonce, userData})
		mu.Unlock()
		return append([]byte("doc:"), nonce...), nil
	}
	a := newAttester(t, fake, staticKeys(keys))
	ctx := ctxT(t)

	steps := []struct {
		name            string
		nonce, userData []byte
		wantCalls       uint64
		wantUserData    []byte // what the NSM must have been sent
	}{
		{"first start-up request", nil, nil, 1, startup},
		{"cached", nil, nil, 1, nil},
		{"cached, empty slices", []byte{}, []byte{}, 1, nil},
		{"nonce", []byte("n1"), nil, 2, startup},
		{"same nonce again: fresh too", []byte("n1"), nil, 3, startup},
		{"user data only", nil, []byte("ud"), 4, mustCompute(t, keys, []byte("ud"))},
		{"nonce and user data", []byte("n2"), []byte("ud"), 5, mustCompute(t, keys, []byte("ud"))},
		{"still cached", nil, nil, 5, nil},
	}
	for _, s := range steps {
		res, err := a.Attest(ctx, s.nonce, s.userData)
		if err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if got := a.NSMCalls(); got != s.wantCalls || uint64(fake.calls.Load()) != s.wantCalls {
			t.Fatalf("%s: NSMCalls = %d (fake saw %d), want %d", s.name, got, fake.calls.Load(), s.wantCalls)
		}
		if want := append([]byte("doc:"), s.nonce...); !bytes.Equal(res.Document, want) {
			t.Errorf("%s: document %q, want %q", s.name, res.Document, want)
		}
		if s.wantUserData != nil {
			last := seen[len(seen)-1]
			if !bytes.Equal(last[1], s.wantUserData) || !bytes.Equal(last[0], s.nonce) {
				t.Errorf("%s: NSM got nonce %q user_data %x, want %q %x", s.name, last[0], last[1], s.nonce, s.wantUserData)
			}
		}
		if res.Simulated || res.RootDER != nil || len(res.Keys) != len(keys) {
			t.Errorf("%s: result simulated %v, root %d bytes, %d keys", s.name, res.Simulated, len(res.RootDER), len(res.Keys))
		}
	}

	// The caller owns the returned bytes.
	res, _ := a.Attest(ctx, nil, nil)
	res.Document[0] = 'X'
	res.Keys[0].KeyId = "mangled"
	res, _ = a.Attest(ctx, nil, nil)
	if string(res.Document) != "doc:" || res.Keys[0].KeyId == "mangled" {
		t.Error("the cache shares memory with results")
	}
}

func mustCompute(t *testing.T, keys []*pb.KeyInfo, ud []byte) []byte {
	t.Helper()
	c, err := keycommit.Compute(keys, ud)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestAttesterConcurrentStartup(t *testing.T) {
	fake := &fakeNSM{attestation: func(_, _, _ []byte) ([]byte, error) {
		time.Sleep(10 * time.Millisecond) // an ioctl takes a while
		return []byte("doc"), nil
	}}
	a := newAttester(t, fake, staticKeys(keycommittest.Keys(t)))
	ctx := ctxT(t)
	var wg sync.WaitGroup
	for i := 0; i < 32; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var nonce []byte
			if i%4 == 0 {
				nonce = []byte{byte(i)}
			}
			if _, err := a.Attest(ctx, nonce, nil); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if got := a.NSMCalls(); got != 1+8 {
		t.Errorf("NSMCalls = %d, want 9 (one start-up document, 8 nonces)", got)
	}
}

func TestAttesterRenewal(t *testing.T) {
	keys := keycommittest.Keys(t)
	current := keys
	var mu sync.Mutex
	src := keySource(func() []*pb.KeyInfo {
		mu.Lock()
		defer mu.Unlock()
		return current
	})
	clk := &clock{t: time.Now()}
	sim, err := attest.NewSimulatedAt(zaptest.NewLogger(t), clk.now)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	a, err := attest.New(attest.Params{
		Config: attest.Config{CacheMaxAge: 2 * time.Hour},
		Logger: zaptest.NewLogger(t), NSM: sim, Keys: src,
	})
	if err != nil {
		t.Fatal(err)
	}
	attest.SetClock(a, clk.now)
	ctx := ctxT(t)
	root, _ := x509.ParseCertificate(sim.DevRootDER())

	get := func(wantCalls uint64, why string) {
		t.Helper()
		res, err := a.Attest(ctx, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		if got := a.NSMCalls(); got != wantCalls {
			t.Fatalf("%s: NSMCalls = %d, want %d", why, got, wantCalls)
		}
		mu.Lock()
		k := current
		mu.Unlock()
		if _, err := verify.Verify(res.Document, verify.Options{Root: root, Time: clk.now(), Keys: k, RequireKeyCommitment: true}); err != nil {
			t.Fatalf("%s: served document does not verify now: %v", why, err)
		}
	}
	get(1, "first")
	clk.advance(30 * time.Second)
	get(1, "young")
	clk.advance(2 * time.Hour)
	// The leaf (3 h) has less than 30 min left: renewed before maxAge.
	get(2, "leaf near expiry")
	clk.advance(time.Hour)
	get(2, "fresh leaf, an hour old")
	mu.Lock()
	current = keys[:2]
	mu.Unlock()
	get(3, "keys changed")
}

func TestAttesterRefusals(t *testing.T) {
	keys := keycommittest.Keys(t)
	big := make([]byte, attest.MaxFieldSize+1)
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	nsmDown := errors.New("ioctl: EIO")
	tests := []struct {
		name            string
		keys            []*pb.KeyInfo
		nsmErr          error
		ctx             context.Context
		nonce, userData []byte
		want            error
		wantText        string
		wantCalls       uint64
	}{
		{name: "nonce too large", nonce: big, want: attest.ErrInvalidArgument, wantText: "nonce is 1025 bytes, at most 1024"},
		{name: "user data too large", userData: big, want: attest.ErrInvalidArgument, wantText: "user_data is 1025 bytes, at most 1024"},
		{name: "no keys", keys: []*pb.KeyInfo{}, want: attest.ErrKeys},
		{name: "key with a wrong id", keys: []*pb.KeyInfo{{KeyId: "00", PublicKey: keys[0].PublicKey}}, want: attest.ErrKeys},
		{name: "NSM failure, start-up document", nsmErr: nsmDown, want: attest.ErrNSM, wantCalls: 1},
		{name: "NSM failure, fresh document", nsmErr: nsmDown, nonce: []byte("n"), want: attest.ErrNSM, wantCalls: 1},
		{name: "canceled, start-up", ctx: canceled, want: context.Canceled},
		{name: "canceled, fresh", ctx: canceled, nonce: []byte("n"), want: context.Canceled},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fake := &fakeNSM{}
			if tt.nsmErr != nil {
				fake.attestation = func(_, _, _ []byte) ([]byte, error) {
					return nil, errors.Join(attest.ErrNSM, tt.nsmErr)
				}
			}
			k := keys
			if tt.keys != nil {
				k = tt.keys
			}
			a := newAttester(t, fake, staticKeys(k))
			ctx := tt.ctx
			if ctx == nil {
				ctx = ctxT(t)
			}
			res, err := a.Attest(ctx, tt.nonce, tt.userData)
			if !errors.Is(err, tt.want) || res != nil {
				t.Fatalf("Attest = %v, %v; want %v", res, err, tt.want)
			}
			if !strings.Contains(err.Error(), tt.wantText) {
				t.Errorf("error %q does not say %q", err, tt.wantText)
			}
			if a.NSMCalls() != tt.wantCalls {
				t.Errorf("NSMCalls = %d, want %d", a.NSMCalls(), tt.wantCalls)
			}
		})
	}

	t.Run("start-up failure is retried", func(t *testing.T) {
		var fail atomic.Bool
		fail.Store(true)
		fake := &fakeNSM{attestation: func(_, _, _ []byte) ([]byte, error) {
			if fail.Load() {
				return nil, attest.ErrNSM
			}
			return []byte("doc"), nil
		}}
		a := newAttester(t, fake, staticKeys(keys))
		if _, err := a.Attest(ctxT(t), nil, nil); !errors.Is(err, attest.ErrNSM) {
			t.Fatalf("first: %v", err)
		}
		fail.Store(false)
		if _, err := a.Attest(ctxT(t), nil, nil); err != nil {
			t.Fatalf("second: %v", err)
		}
		if a.NSMCalls() != 2 {
			t.Errorf("NSMCalls = %d, want 2", a.NSMCalls())
		}
	})

	t.Run("New without NSM or keys", func(t *testing.T) {
		if _, err := attest.New(attest.Params{Keys: staticKeys(keys)}); err == nil {
			t.Error("nil NSM accepted")
		}
		if _, err := attest.New(attest.Params{NSM: &fakeNSM{}}); err == nil {
			t.Error("nil KeySource accepted")
		}
	})
}

// TestAttesterEndToEnd runs the Attester on the simulated NSM and checks
// its results the way a client would.
func TestAttesterEndToEnd(t *testing.T) {
	sim, root := simulated(t)
	keys := keycommittest.Keys(t)
	a := newAttester(t, sim, staticKeys(keys))
	ctx := ctxT(t)

	res, err := a.Attest(ctx, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Simulated || !bytes.Equal(res.RootDER, root.Raw) {
		t.Fatal("result is not marked simulated with its dev root")
	}
	for i := 1; i < len(res.Keys); i++ {
		if res.Keys[i-1].KeyId >= res.Keys[i].KeyId {
			t.Fatal("result keys are not sorted by key_id")
		}
	}
	if _, err := verify.Verify(res.Document, verify.Options{Root: root, Keys: res.Keys, RequireKeyCommitment: true, Nonce: []byte{}}); err != nil {
		t.Fatalf("start-up document: %v", err)
	}

	nonce, ud := []byte("client nonce"), []byte("client data")
	res, err = a.Attest(ctx, nonce, ud)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := verify.Verify(res.Document, verify.Options{Root: root, Nonce: nonce, Keys: res.Keys, UserData: ud}); err != nil {
		t.Fatalf("fresh document: %v", err)
	}
	swapped := keycommittest.Keys(t)
	swapped[2] = keycommittest.Ed25519(t, 42)
	if _, err := verify.Verify(res.Document, verify.Options{Root: root, Nonce: nonce, Keys: swapped, UserData: ud}); !errors.Is(err, verify.ErrKeyCommitment) {
		t.Fatalf("swapped key: %v, want ErrKeyCommitment", err)
	}
}
