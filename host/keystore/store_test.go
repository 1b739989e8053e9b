package keystore_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/nitrosign/nitrosign/host/keystore"
	"github.com/nitrosign/nitrosign/internal/keysetfmt"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const testARN = "arn:aws:kms:eu-west-1:111122223333:key/0b5c5a3e-1f2d-4c6b-9a8e-7d6f5e4d3c2b"

// sealed is a well-formed sealed keyset (format 1) naming keyIDs, with a
// random blob, nonce and "ciphertext": the host never opens one.
func sealed(t *testing.T, keyIDs ...string) []byte {
	t.Helper()
	if len(keyIDs) == 0 {
		keyIDs = []string{"aa11", "bb22"}
	}
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	frame, err := keysetfmt.Frame(keysetfmt.Header{KMSKeyARN: testARN, KeyIDs: keyIDs, Created: now, Sealed: now.Add(time.Minute)}, random(t, 184))
	if err != nil {
		t.Fatal(err)
	}
	out := append(frame, random(t, keysetfmt.NonceSize+96)...)
	if _, err := keysetfmt.Parse(out); err != nil {
		t.Fatalf("test keyset does not parse: %v", err)
	}
	return out
}

func random(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func sum(b []byte) []byte { s := sha256.Sum256(b); return s[:] }

type fixture struct {
	store *keystore.Store
	path  string
	logs  *observer.ObservedLogs
}

func newStore(t *testing.T) *fixture {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	path := filepath.Join(t.TempDir(), "keyset.sealed")
	s, err := keystore.NewStore(path, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{store: s, path: path, logs: logs}
}

func write(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func read(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func absent(t *testing.T, path string) {
	t.Helper()
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("%s exists (err %v), want it absent", path, err)
	}
}

// noTemps fails when a temporary file of a Put is left in the directory.
func noTemps(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Fatalf("temporary file %s left behind", e.Name())
		}
	}
}

func TestGet(t *testing.T) {
	ks := sealed(t)
	tests := []struct {
		name     string
		setup    func(t *testing.T, path string)
		wantSeal []byte
		wantInit bool
	}{
		{"none", func(*testing.T, string) {}, nil, false},
		{"none, init requested", func(t *testing.T, p string) { write(t, keystore.InitPath(p), nil) }, nil, true},
		{"none, only a previous one: no init", func(t *testing.T, p string) { write(t, keystore.PrevPath(p), ks) }, nil, false},
		{"a keyset", func(t *testing.T, p string) { write(t, p, ks) }, ks, false},
		{"a keyset and a stale init marker", func(t *testing.T, p string) { write(t, p, ks); write(t, keystore.InitPath(p), nil) }, ks, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newStore(t)
			tt.setup(t, f.path)
			got, err := f.store.Get()
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got.Sealed, tt.wantSeal) || (got.Sealed == nil) != (tt.wantSeal == nil) || got.InitRequested != tt.wantInit || got.Location != f.path {
				t.Fatalf("Get = %d bytes (nil %v), init %v, location %q; want %d bytes, init %v, %q",
					len(got.Sealed), got.Sealed == nil, got.InitRequested, got.Location, len(tt.wantSeal), tt.wantInit, f.path)
			}
		})
	}
}

// A file that does not parse is handed over as it is, with a warning, and
// left where it is.
func TestGetCorruptReturnedAsIs(t *testing.T) {
	f := newStore(t)
	garbage := []byte("NSKS\x01 this is not a keyset")
	write(t, f.path, garbage)
	for range 3 {
		got, err := f.store.Get()
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.Sealed, garbage) {
			t.Fatalf("Get = %q, want the file as it is", got.Sealed)
		}
	}
	if !bytes.Equal(read(t, f.path), garbage) {
		t.Fatal("the corrupt file changed")
	}
	warns := f.logs.FilterMessageSnippet("does not parse").All()
	if len(warns) != 1 {
		t.Fatalf("%d warnings about the corrupt file, want 1 (throttled): %v", len(warns), f.logs.All())
	}
	if e, _ := warns[0].ContextMap()["error"].(string); !strings.Contains(e, "sealed keyset corrupt") {
		t.Fatalf("warning names no cause: %v", warns[0].ContextMap())
	}
}

func TestGetRefuses(t *testing.T) {
	t.Run("too large", func(t *testing.T) {
		f := newStore(t)
		write(t, f.path, make([]byte, keysetfmt.MaxSize+1))
		_, err := f.store.Get()
		if !errors.Is(err, keystore.ErrTooLarge) || !strings.Contains(err.Error(), "is 1048577 bytes, and a sealed keyset is at most 1048576") {
			t.Fatalf("Get = %v, want ErrTooLarge with both sizes", err)
		}
		if _, err := os.Stat(f.path); err != nil {
			t.Fatal("the oversized file was removed")
		}
	})
	t.Run("empty", func(t *testing.T) {
		f := newStore(t)
		write(t, f.path, nil)
		write(t, keystore.InitPath(f.path), nil)
		_, err := f.store.Get()
		if !errors.Is(err, keystore.ErrEmpty) || !strings.Contains(err.Error(), "is empty, so it holds no keyset") {
			t.Fatalf("Get = %v, want ErrEmpty", err)
		}
	})
	t.Run("exactly the largest size", func(t *testing.T) {
		f := newStore(t)
		write(t, f.path, make([]byte, keysetfmt.MaxSize))
		if got, err := f.store.Get(); err != nil || len(got.Sealed) != keysetfmt.MaxSize {
			t.Fatalf("Get = %d bytes, %v", len(got.Sealed), err)
		}
	})
	t.Run("a directory", func(t *testing.T) {
		f := newStore(t)
		if err := os.Mkdir(f.path, 0o700); err != nil {
			t.Fatal(err)
		}
		if _, err := f.store.Get(); err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Fatalf("Get = %v", err)
		}
	})
	t.Run("a FIFO, without blocking", func(t *testing.T) {
		f := newStore(t)
		if err := syscall.Mkfifo(f.path, 0o600); err != nil {
			t.Skipf("mkfifo: %v", err)
		}
		done := make(chan error, 1)
		go func() { _, err := f.store.Get(); done <- err }()
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), "not a regular file") {
				t.Fatalf("Get = %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Get blocked on a FIFO")
		}
	})
}

func TestPutFirstKeyset(t *testing.T) {
	f := newStore(t)
	ks := sealed(t)
	if _, err := f.store.Put(ks, nil); !errors.Is(err, keystore.ErrNoInit) || !strings.Contains(err.Error(), "nitrosign keyset init") {
		t.Fatalf("Put without init = %v, want ErrNoInit naming the command", err)
	}
	absent(t, f.path)
	write(t, keystore.InitPath(f.path), []byte("requested\n"))
	res, err := f.store.Put(ks, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Location != f.path || res.PreviousLocation != "" {
		t.Fatalf("Put = %+v", res)
	}
	if !bytes.Equal(read(t, f.path), ks) {
		t.Fatal("stored bytes differ")
	}
	fi, err := os.Stat(f.path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, %v; want 0600", fi.Mode(), err)
	}
	absent(t, keystore.InitPath(f.path))
	absent(t, keystore.PrevPath(f.path))
	noTemps(t, filepath.Dir(f.path))
	got, err := f.store.Get()
	if err != nil || !bytes.Equal(got.Sealed, ks) || got.InitRequested {
		t.Fatalf("Get after Put: %v, init %v", err, got.InitRequested)
	}
	// The info line names the header, never the bytes.
	stored := f.logs.FilterMessage("stored a new sealed keyset").All()
	if len(stored) != 1 {
		t.Fatalf("want one info line for the stored keyset, got %v", f.logs.All())
	}
	m := stored[0].ContextMap()
	if m["kms_key_arn"] != testARN || m["location"] != f.path || m["init_marker_removed"] != true {
		t.Fatalf("stored line fields: %v", m)
	}
	if ids, ok := m["key_ids"].([]any); !ok || len(ids) != 2 || ids[0] != "aa11" {
		t.Fatalf("stored line key_ids: %#v", m["key_ids"])
	}
}

func TestPutReplaces(t *testing.T) {
	f := newStore(t)
	v1, v2, v3 := sealed(t, "01"), sealed(t, "02"), sealed(t, "03")
	write(t, f.path, v1)

	// Correct replaces: v1 kept as .prev, v2 stored.
	res, err := f.store.Put(v2, sum(v1))
	if err != nil {
		t.Fatal(err)
	}
	if res.PreviousLocation != keystore.PrevPath(f.path) {
		t.Fatalf("previous location %q", res.PreviousLocation)
	}
	if !bytes.Equal(read(t, f.path), v2) || !bytes.Equal(read(t, keystore.PrevPath(f.path)), v1) {
		t.Fatal("after the first rotation: want PATH = v2, PATH.prev = v1")
	}

	// Stale replaces (v1 again: another enclave rotated first): Aborted,
	// nothing overwritten.
	for _, tt := range []struct {
		name     string
		replaces []byte
		want     string
	}{
		{"stale", sum(v1), "another enclave changed it first"},
		{"none while one exists", nil, "already holds a keyset"},
		{"unknown", sum([]byte("x")), "another enclave changed it first"},
	} {
		_, err := f.store.Put(v3, tt.replaces)
		if !errors.Is(err, keystore.ErrChanged) || !strings.Contains(err.Error(), tt.want) {
			t.Fatalf("%s: Put = %v, want ErrChanged %q", tt.name, err, tt.want)
		}
		if !bytes.Equal(read(t, f.path), v2) || !bytes.Equal(read(t, keystore.PrevPath(f.path)), v1) {
			t.Fatalf("%s: a refused Put changed the files", tt.name)
		}
	}

	// The next rotation: v2 becomes .prev, exactly its bytes.
	if _, err := f.store.Put(v3, sum(v2)); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(read(t, f.path), v3) || !bytes.Equal(read(t, keystore.PrevPath(f.path)), v2) {
		t.Fatal("after the second rotation: want PATH = v3, PATH.prev = v2")
	}
	noTemps(t, filepath.Dir(f.path))
}

// A repeated Put of the keyset stored already (an enclave that lost the
// answer) succeeds and changes nothing.
func TestPutRepeated(t *testing.T) {
	f := newStore(t)
	v1, v2 := sealed(t, "01"), sealed(t, "02")
	write(t, f.path, v1)
	if _, err := f.store.Put(v2, sum(v1)); err != nil {
		t.Fatal(err)
	}
	res, err := f.store.Put(v2, sum(v1))
	if err != nil {
		t.Fatalf("repeated Put: %v", err)
	}
	if res.PreviousLocation != keystore.PrevPath(f.path) || !bytes.Equal(read(t, keystore.PrevPath(f.path)), v1) || !bytes.Equal(read(t, f.path), v2) {
		t.Fatalf("repeated Put changed something: %+v", res)
	}
}

func TestPutRefusesGarbage(t *testing.T) {
	f := newStore(t)
	v1 := sealed(t)
	write(t, f.path, v1)
	oversized := append(sealed(t), make([]byte, keysetfmt.MaxSize)...)
	for _, tt := range []struct {
		name     string
		sealed   []byte
		replaces []byte
		want     string
	}{
		{"empty", nil, sum(v1), "no \"NSKS\" magic"},
		{"garbage", []byte("hello, keystore"), sum(v1), "no \"NSKS\" magic"},
		{"truncated", v1[:40], sum(v1), "header of"},
		{"oversized", oversized, sum(v1), "at most 1048576"},
		{"replaces of the wrong length", sealed(t), []byte("short"), "replaces_sha256 is 5 bytes, want 32"},
	} {
		_, err := f.store.Put(tt.sealed, tt.replaces)
		if !errors.Is(err, keystore.ErrInvalid) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: Put = %v, want ErrInvalid %q", tt.name, err, tt.want)
		}
	}
	if !bytes.Equal(read(t, f.path), v1) {
		t.Fatal("a refused Put changed the file")
	}
	absent(t, keystore.PrevPath(f.path))
	noTemps(t, filepath.Dir(f.path))
}

// PATH holds a whole keyset at every step of a Put, and PATH.prev either
// the keyset before the last one or the one replaced.
func TestPutNeverLeavesPathAbsent(t *testing.T) {
	f := newStore(t)
	v0, v1, v2 := sealed(t, "00"), sealed(t, "01"), sealed(t, "02")
	write(t, keystore.PrevPath(f.path), v0)
	write(t, f.path, v1)
	var steps []string
	f.store.SetStepHook(func(step string) error {
		steps = append(steps, step)
		b, err := os.ReadFile(f.path)
		if err != nil {
			t.Errorf("after %q: PATH unreadable: %v", step, err)
			return nil
		}
		if !bytes.Equal(b, v1) && !bytes.Equal(b, v2) {
			t.Errorf("after %q: PATH holds neither the old nor the new keyset", step)
		}
		if p := read(t, keystore.PrevPath(f.path)); !bytes.Equal(p, v0) && !bytes.Equal(p, v1) {
			t.Errorf("after %q: PATH.prev holds neither the older nor the replaced keyset", step)
		}
		return nil
	})
	if _, err := f.store.Put(v2, sum(v1)); err != nil {
		t.Fatal(err)
	}
	if strings.Join(steps, ",") != strings.Join(keystore.PutSteps, ",") {
		t.Fatalf("steps %q, want %q", steps, keystore.PutSteps)
	}
	if !bytes.Equal(read(t, f.path), v2) || !bytes.Equal(read(t, keystore.PrevPath(f.path)), v1) {
		t.Fatal("want PATH = v2 and PATH.prev = v1")
	}
}

// A Put that fails at any step (an I/O error, or a crash: what is on disk
// then is what a restarted proxy finds) leaves a whole keyset at PATH, no
// temporary file, and PATH.prev untouched until the replaced keyset is
// kept there.
func TestPutFailureAtEachStep(t *testing.T) {
	for i, failAt := range keystore.PutSteps {
		t.Run(failAt, func(t *testing.T) {
			f := newStore(t)
			v0, v1, v2 := sealed(t, "00"), sealed(t, "01"), sealed(t, "02")
			write(t, keystore.PrevPath(f.path), v0)
			write(t, f.path, v1)
			f.store.SetStepHook(func(step string) error {
				if step == failAt {
					return errors.New("injected failure")
				}
				return nil
			})
			if _, err := f.store.Put(v2, sum(v1)); err == nil || !strings.Contains(err.Error(), "injected failure") {
				t.Fatalf("Put = %v, want the injected failure", err)
			}
			replaced := i >= 3 // stepReplaced and after: the new keyset is in place
			wantPath, wantPrev := v1, v0
			if replaced {
				wantPath = v2
			}
			if i >= 2 { // stepPrevKept and after: the replaced keyset is kept
				wantPrev = v1
			}
			if !bytes.Equal(read(t, f.path), wantPath) {
				t.Errorf("PATH changed wrongly (replaced %v)", replaced)
			}
			if !bytes.Equal(read(t, keystore.PrevPath(f.path)), wantPrev) {
				t.Error("PATH.prev changed wrongly")
			}
			noTemps(t, filepath.Dir(f.path))
			// The enclave's retry is answered: stored, or already stored.
			f.store.SetStepHook(nil)
			if _, err := f.store.Put(v2, sum(v1)); err != nil {
				t.Fatalf("retry: %v", err)
			}
			if !bytes.Equal(read(t, f.path), v2) || !bytes.Equal(read(t, keystore.PrevPath(f.path)), v1) {
				t.Fatal("after the retry: want PATH = v2 and PATH.prev = v1")
			}
		})
	}
}

// Of several enclaves rotating from the same keyset at once, one wins and
// the others are told the keyset changed.
func TestPutConcurrent(t *testing.T) {
	f := newStore(t)
	v1 := sealed(t, "01")
	write(t, f.path, v1)
	const n = 8
	var wg sync.WaitGroup
	errs := make([]error, n)
	keysets := make([][]byte, n)
	for i := range n {
		keysets[i] = sealed(t, strings.Repeat("a", i+1))
	}
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = f.store.Put(keysets[i], sum(v1))
		}()
	}
	wg.Wait()
	won := -1
	for i, err := range errs {
		switch {
		case err == nil:
			if won >= 0 {
				t.Fatalf("Puts %d and %d both won", won, i)
			}
			won = i
		case !errors.Is(err, keystore.ErrChanged):
			t.Fatalf("Put %d: %v, want ErrChanged", i, err)
		}
	}
	if won < 0 {
		t.Fatal("no Put won")
	}
	if !bytes.Equal(read(t, f.path), keysets[won]) || !bytes.Equal(read(t, keystore.PrevPath(f.path)), v1) {
		t.Fatal("the files do not hold the winner and the keyset it replaced")
	}
}

func TestCheck(t *testing.T) {
	t.Run("removes temporary files and logs the header", func(t *testing.T) {
		f := newStore(t)
		write(t, f.path, sealed(t))
		dir := filepath.Dir(f.path)
		left := filepath.Join(dir, ".keyset.sealed.tmp-123")
		write(t, left, []byte("half"))
		other := filepath.Join(dir, "unrelated.tmp-1")
		write(t, other, []byte("x"))
		if err := f.store.Check(); err != nil {
			t.Fatal(err)
		}
		absent(t, left)
		if _, err := os.Stat(other); err != nil {
			t.Fatal("Check removed a file that is not its own")
		}
		holding := f.logs.FilterMessage("holding a sealed keyset").All()
		if len(holding) != 1 || holding[0].ContextMap()["kms_key_arn"] != testARN {
			t.Fatalf("want the header logged: %v", f.logs.All())
		}
	})
	t.Run("no directory", func(t *testing.T) {
		s, err := keystore.NewStore(filepath.Join(t.TempDir(), "missing", "keyset.sealed"), zap.NewNop())
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Check(); err == nil || !strings.Contains(err.Error(), "StateDirectory=nitrosign") {
			t.Fatalf("Check = %v", err)
		}
	})
	t.Run("an unreadable keyset is logged, not fatal", func(t *testing.T) {
		f := newStore(t)
		write(t, f.path, make([]byte, keysetfmt.MaxSize+1))
		if err := f.store.Check(); err != nil {
			t.Fatalf("Check = %v", err)
		}
		if e := f.logs.FilterMessageSnippet("cannot be read").All(); len(e) != 1 || e[0].Level != zap.ErrorLevel {
			t.Fatalf("want one error line: %v", f.logs.All())
		}
	})
	t.Run("only a previous keyset", func(t *testing.T) {
		f := newStore(t)
		write(t, keystore.PrevPath(f.path), sealed(t))
		if err := f.store.Check(); err != nil {
			t.Fatal(err)
		}
		if f.logs.FilterMessageSnippet("restored (mv").Len() != 1 {
			t.Fatalf("want a warning saying how to restore: %v", f.logs.All())
		}
	})
}
